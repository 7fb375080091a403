"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis, every check): no request gets a 500, every
response matches the schema (statuses, bodies, headers, Allow), schema-valid requests are accepted and invalid
ones refused; then stateful sequences that follow the schema's links (upload -> status / query / delete)."""

import tempfile

import pytest
from hypothesis import HealthCheck, settings

from memlm.cli import load_store_model
from memlm.serve.app import Limits, create_app
from memlm.store import MemoryStore

schemathesis = pytest.importorskip("schemathesis", reason="the dev extra installs schemathesis")
pytestmark = pytest.mark.slow

LIMITS = Limits(max_document_bytes=1 << 16, max_prompt_chars=256, max_new_tokens=4)  # keep each case cheap
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck))

# schemathesis reads the schema when the module is collected: the app exists by then (over a throwaway store)
STORE_DIR = tempfile.TemporaryDirectory(prefix="memlm-fuzz-")
STORE = MemoryStore(STORE_DIR.name)
APP = create_app(STORE, load_store_model(None), limits=LIMITS)
# 413 is a right answer to a schema-valid upload too: an offset and a body each within the limits, their sum not
CONFIG = schemathesis.config.SchemathesisConfig.from_dict({"checks": {"positive_data_acceptance": {
    "expected-statuses": ["2xx", "3xx", "401", "404", "409", "413"]}}})
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=CONFIG)


@schema.parametrize()
@settings(FUZZ, max_examples=100)
def test_every_operation_answers_as_its_schema_says(case):
    case.call_and_validate()


class Sequences(schema.as_state_machine()):
    def setup(self) -> None:  # every sequence starts from an empty store, so a replayed example replays exactly
        for document in STORE.documents(replacements=True):
            STORE.delete(document.id)


def test_stateful_sequences_follow_the_links():
    Sequences.run(settings=settings(FUZZ, max_examples=40, stateful_step_count=6))
