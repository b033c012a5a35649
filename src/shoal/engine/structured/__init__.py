"""Constrained decoding: grammars compiled off the engine thread (compiler), token masks
filled while the model runs (masks), requests held until their grammar is ready (waiting)."""
