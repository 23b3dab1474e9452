"""Default values shared by the Python API (``LLM``, ``LLM.generate``) and the ``parallax``
command, so ``parallax generate`` and ``llm.generate`` behave the same when given nothing.

tests/test_cli.py checks that every CLI default equals the matching Python default.
"""

from .loading import DEFAULT_MODEL as MODEL           # noqa: F401  (where the name resolves)
from .parallel.context import DEFAULT_TIMEOUT_S as TIMEOUT_S   # noqa: F401

# Layout and precision (LLM.__init__).
TP = 1                      # tensor-parallel ranks
PP = 1                      # pipeline stages
DTYPE = "float32"           # weights and activations
DEVICE = "cpu"

# Serving engine (LLM.__init__, Scheduler; docs/engine.md "The scheduler").
MAX_NUM_SEQS = 64               # running requests at most
MAX_NUM_BATCHED_TOKENS = 512    # tokens computed per step at most (chunked prefill beyond)

# Generation (LLM.generate / LLM.stream).
MAX_NEW_TOKENS = 32
TEMPERATURE = 0.0           # 0 = greedy
TOP_P = 1.0                 # 1 = no nucleus filtering
REPETITION_PENALTY = 1.0    # 1 = off

DTYPES = ("float32", "bfloat16", "float16")   # the names; engine.DTYPES also takes aliases
