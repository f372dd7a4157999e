"""Stage `eval`: run by dvc.yaml as `python stages/eval.py --spec SPEC --out DIR ...` (see `--help`)."""

from flowopd.phases import stage_main

if __name__ == "__main__":
    stage_main("eval")
