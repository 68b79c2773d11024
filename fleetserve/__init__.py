"""fleetserve: an open-weights LLM from a model id to an OpenAI-compatible endpoint."""

import os

# CPU serving shares the machine (several replicas, the control plane, clients): OpenMP threads that
# spin while waiting collapse under contention (measured: a batch-16 step 9x slower with one other
# busy process). Sleeping waits cost little when the machine is idle. Set before torch loads
# libgomp; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
