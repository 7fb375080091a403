// The two-stage search fused for CPUs (two_stage.py has the algorithm, the margin argument and the torch screen
// this file must agree with). Each task (a row of the memory and a range of its queries) runs on one thread,
// block by block: score the block's bfloat16 keys against the bfloat16 queries with at::mm (oneDNN, one thread),
// then, while the scores are in the core's cache, take the maxima of groups of 16 consecutive slots, keep each
// query's largest maxima in a pool (its k-th largest is the running theta), and collect the entries whose
// screened score clears the threshold of that theta. The last threshold filters the survivors again, their
// exact products with the stored keys (summed in double) rank them, and each query's k best are written out.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kGroup = 16;  // two_stage.GROUP

inline float bfloat16_to_float(uint16_t bits) {
  const uint32_t widened = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof value);
  return value;
}

// The screened score an entry needs to be in the top-k, given k entries screened at least theta (two_stage.py).
inline float threshold_of(float theta, float a, float v) {
  const float reach = theta - a - v * std::fabs(theta) - a;
  return reach >= 0 ? reach / (1 + v) : reach / (1 - v);
}

// Calls visit(j) for every j with flags[j] set, skipping eight clear flags at a time (most are clear).
template <typename Visit>
inline void for_each_flag(const std::vector<char>& flags, Visit visit) {
  const int64_t size = static_cast<int64_t>(flags.size());
  int64_t j = 0;
  for (; j + 8 <= size; j += 8) {
    uint64_t word;
    std::memcpy(&word, flags.data() + j, sizeof word);
    for (; word != 0; word &= word - 1) visit(j + __builtin_ctzll(word) / 8);
  }
  for (; j < size; ++j) {
    if (flags[j]) visit(j);
  }
}

// The exact score every route ranks by (two_stage.py's exact_scores): the products summed in double (each product
// of two floats is exact there), rounded once to float32.
template <typename Key>
inline float dot(const Key* key, const float* query, int64_t dim) {
  double total = 0;
  for (int64_t d = 0; d < dim; ++d) total += static_cast<double>(static_cast<float>(key[d])) * query[d];
  return static_cast<float>(total);
}

struct Survivor {
  int64_t slot;
  int64_t query;
  float score;
};

}  // namespace

// One task: row `row`, queries `first .. last - 1`, on one thread. Writes their k best (float32 score, slot) into
// scores_out and slots_out; false where the screen gives up (a threshold not finite, or more than candidate_limit
// survivors per query).
template <typename Key>
bool search_task(const at::Tensor& screen, const at::Tensor& keys, const at::Tensor& low_t,
                 const at::Tensor& queries, const at::Tensor& margin, int64_t row, int64_t size, int64_t first,
                 int64_t last, float v, int64_t k, int64_t slots, int64_t lead_block, int64_t block,
                 int64_t candidate_limit, const at::Tensor& scores_scratch, const at::Tensor& maxima_scratch,
                 at::Tensor& scores_out, at::Tensor& slots_out) {
  const int64_t width = last - first, dim = keys.size(2);
  const auto margin_at = margin.accessor<float, 2>();
  // Each query's largest group maxima: a pool of 2k, whose first k after settle() are its k largest and whose
  // k-th largest is `theta` (a heap cost more: every rise of theta was a pop and a push). Between settles theta
  // lags (it still certifies k entries) and only maxima above it enter the pool.
  std::vector<float> pool(width * 2 * k), theta(width, -INFINITY), threshold(width);
  std::vector<int64_t> pooled(width, 0);
  auto settle = [&](int64_t j) {
    float* mine = pool.data() + j * 2 * k;
    std::nth_element(mine, mine + k - 1, mine + pooled[j], std::greater<float>());
    theta[j] = mine[k - 1];
    pooled[j] = k;
  };
  float* maxima = maxima_scratch.data_ptr<float>();  // this thread's: fresh buffers would cost page faults
  std::vector<char> flags(width);
  at::BFloat16* scratch = scores_scratch.data_ptr<at::BFloat16>();
  std::vector<Survivor> survivors;
  survivors.reserve(4 * k * width);
  const at::Tensor screened_queries = low_t[row].narrow(1, first, width);  // [dim, width]
  for (int64_t start = 0, n = 0; start < std::min(slots, size); start += n) {
    n = std::min(start == 0 ? lead_block : block, slots - start);
    const int64_t live = std::min(n, size - start), groups = (live + kGroup - 1) / kGroup;
    at::Tensor out = torch::from_blob(scratch, {n, width}, torch::kBFloat16);
    at::mm_out(out, screen[row].narrow(0, start, n), screened_queries);
    const uint16_t* scores = reinterpret_cast<const uint16_t*>(scratch);
    // the maxima of groups of 16 consecutive slots; those above their query's theta join its pool
    for (int64_t group = 0; group < groups; ++group) {
      float* top = maxima + group * width;
      std::fill(top, top + width, -INFINITY);
      for (int64_t slot = group * kGroup; slot < std::min(live, (group + 1) * kGroup); ++slot) {
        const uint16_t* line = scores + slot * width;
        for (int64_t j = 0; j < width; ++j) {
          const float x = bfloat16_to_float(line[j]);
          top[j] = x > top[j] ? x : top[j];  // a NaN never wins (two_stage.py refuses NaN bounds and queries)
        }
      }
      for (int64_t j = 0; j < width; ++j) flags[j] = top[j] > theta[j];
      for_each_flag(flags, [&](int64_t j) {
        pool[j * 2 * k + pooled[j]++] = top[j];
        if (pooled[j] == 2 * k) settle(j);
      });
    }
    for (int64_t j = 0; j < width; ++j) {
      // settled where the pool has grown by a quarter (each settle is an nth_element): theta lags a little
      if (start == 0 ? pooled[j] >= k : pooled[j] >= k + k / 4) settle(j);
      threshold[j] = threshold_of(theta[j], margin_at[row][first + j], v);
      if (!std::isfinite(threshold[j])) return false;  // a screened score overflowed
    }
    // only the members of groups whose maximum clears the threshold are read again
    for (int64_t group = 0; group < groups; ++group) {
      const float* top = maxima + group * width;
      for (int64_t j = 0; j < width; ++j) flags[j] = top[j] >= threshold[j];
      for_each_flag(flags, [&](int64_t j) {
        for (int64_t slot = group * kGroup; slot < std::min(live, (group + 1) * kGroup); ++slot) {
          const float x = bfloat16_to_float(scores[slot * width + j]);
          if (x >= threshold[j]) survivors.push_back({start + slot, j, x});
        }
      });
    }
    if (static_cast<int64_t>(survivors.size()) > candidate_limit * width) return false;  // near ties
  }
  // The last threshold, settled, is the tightest: earlier survivors below it cannot win. The rest are bucketed
  // by query, re-scored exactly from the stored keys, and ranked.
  std::vector<int64_t> start_of(width + 1, 0);
  for (int64_t j = 0; j < width; ++j) {
    if (pooled[j] > k) settle(j);
    threshold[j] = threshold_of(theta[j], margin_at[row][first + j], v);
  }
  for (const Survivor& s : survivors) start_of[s.query + 1] += s.score >= threshold[s.query];
  for (int64_t j = 0; j < width; ++j) start_of[j + 1] += start_of[j];
  std::vector<int64_t> bucketed(start_of[width]), next(start_of.begin(), start_of.end() - 1);
  for (const Survivor& s : survivors) {
    if (s.score >= threshold[s.query]) bucketed[next[s.query]++] = s.slot;
  }
  const Key* stored = keys[row].data_ptr<Key>();
  const float* asked = queries[row].data_ptr<float>();
  float* best_scores = scores_out[row].data_ptr<float>();
  int64_t* best_slots = slots_out[row].data_ptr<int64_t>();
  std::vector<std::pair<float, int64_t>> ranked;
  for (int64_t j = 0; j < width; ++j) {
    if (start_of[j + 1] - start_of[j] < k) return false;  // cannot happen (theta's k entries survive): be safe
    const float* query = asked + (first + j) * dim;
    ranked.clear();
    for (int64_t i = start_of[j]; i < start_of[j + 1]; ++i) {
      ranked.emplace_back(dot(stored + bucketed[i] * dim, query, dim), bucketed[i]);
    }
    std::partial_sort(ranked.begin(), ranked.begin() + k, ranked.end(), [](const auto& x, const auto& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);  // ties: the lower slot first
    });
    for (int64_t i = 0; i < k; ++i) {
      best_scores[(first + j) * k + i] = ranked[i].first;
      best_slots[(first + j) * k + i] = ranked[i].second;
    }
  }
  return true;
}

// screen [rows, allocated, dim] bf16, keys [rows, allocated, dim] (float32, float16 or bfloat16), low_t [rows,
// dim, q] bf16, queries [rows, q, dim] f32, margin [rows, q] f32 (the bound a), sizes [rows] int64. The first
// block of each row has up to lead_block slots (its theta then starts tight), the others as many as fit a task's
// scores in cache_bytes (a core's cache); scores_scratch (bfloat16) is shared out among the threads and bounds
// both, maxima_scratch (float32) holds a 16th of it; both are reused from search to search.
// Returns each query's k best float32 scores [rows, q, k] and slots [rows, q, k] int64, best first, and whether
// the screen gave up (then the first two are undefined).
std::tuple<at::Tensor, at::Tensor, bool> screened_topk(const at::Tensor& screen, const at::Tensor& keys,
                                                       const at::Tensor& low_t, const at::Tensor& queries,
                                                       const at::Tensor& margin, const at::Tensor& sizes, double v,
                                                       int64_t k, int64_t slots, int64_t lead_block,
                                                       int64_t cache_bytes, int64_t candidate_limit,
                                                       const at::Tensor& scores_scratch,
                                                       const at::Tensor& maxima_scratch) {
  TORCH_CHECK(screen.scalar_type() == at::kBFloat16 && low_t.scalar_type() == at::kBFloat16, "bfloat16 screen");
  TORCH_CHECK(queries.scalar_type() == at::kFloat && margin.scalar_type() == at::kFloat, "float32 queries");
  TORCH_CHECK(sizes.scalar_type() == at::kLong, "int64 sizes");
  for (const at::Tensor* t : {&screen, &keys, &low_t, &queries, &margin}) TORCH_CHECK(t->is_contiguous(), "contiguous");
  TORCH_CHECK(lead_block % kGroup == 0 && slots % kGroup == 0 && k > 0, "whole groups");
  const int64_t rows = screen.size(0), q = low_t.size(2);
  // tasks: every row, its queries split where there are fewer rows than threads (at least 16 queries a task)
  const int64_t split = std::max<int64_t>(1, std::min<int64_t>((at::get_num_threads() + rows - 1) / rows, q / 16));
  const int64_t width = (q + split - 1) / split, tasks = rows * split;
  // each thread's blocks live in its share of the scratch: the first block as large as that share allows
  const int64_t threads = at::get_num_threads(), per_thread = scores_scratch.numel() / threads;
  const int64_t room = per_thread / width / kGroup * kGroup;  // slots a block can hold
  const int64_t lead = std::min(lead_block, room);
  const int64_t block = std::min(room, std::max<int64_t>(kGroup, cache_bytes / (2 * width) / kGroup * kGroup));
  TORCH_CHECK(scores_scratch.scalar_type() == at::kBFloat16 && maxima_scratch.scalar_type() == at::kFloat &&
                  room >= k * kGroup && maxima_scratch.numel() >= threads * (per_thread / kGroup),
              "scratch of at least threads x k x 16 x q bfloat16 scores, and a 16th of it in float32 maxima");
  const auto size_at = sizes.accessor<int64_t, 1>();
  at::Tensor scores = torch::empty({rows, q, k}, torch::kFloat), found = torch::empty({rows, q, k}, torch::kLong);
  std::vector<char> kept(tasks, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "screened_topk", [&] {
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / split, first = task % split * width, last = std::min(q, first + width);
        if (first < last) {
          kept[task] = search_task<scalar_t>(screen, keys, low_t, queries, margin, row, size_at[row], first, last,
                                             static_cast<float>(v), k, slots, lead, block, candidate_limit,
                                             scores_scratch.narrow(0, at::get_thread_num() * per_thread, per_thread),
                                             maxima_scratch.narrow(0, at::get_thread_num() * per_thread / kGroup,
                                                                   per_thread / kGroup),
                                             scores, found);
        }
      }
    });
  });
  const bool gave_up = std::find(kept.begin(), kept.end(), 0) != kept.end();
  return {scores, found, gave_up};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("screened_topk", &screened_topk, "the two-stage search fused for CPUs (screen.cpp)");
}
