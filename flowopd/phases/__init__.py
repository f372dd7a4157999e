"""The pipeline's phases, one module each: data, base, teacher, baseline, cold_start, opd, eval.

Each phase reads its part of the resolved spec (`keys`), runs its method, and writes one artifact folder atomically
with its provenance (flowopd.runtime). `stages/<phase>.py`, the command dvc.yaml runs, calls the phase's `main()`.
The paper's three stages are the phases teacher, cold_start and opd; "stage" otherwise always means a DVC stage.
"""
