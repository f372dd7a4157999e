"""Stage `base`: run by dvc.yaml as `python stages/base.py --spec SPEC --out DIR ...` (see `--help`)."""

from flowopd.phases import stage_main

if __name__ == "__main__":
    stage_main("base")
