"""Stage `data`: run by dvc.yaml as `python stages/data.py --spec SPEC --out DIR ...` (see `--help`)."""

from flowopd.phases import stage_main

if __name__ == "__main__":
    stage_main("data")
