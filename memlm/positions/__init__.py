"""Positions: rotary re-rotation with the model's own frequencies, and the position policy of a stream."""
