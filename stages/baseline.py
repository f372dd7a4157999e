"""Stage `baseline`: run by dvc.yaml as `python stages/baseline.py --spec SPEC --base DIR --data DIR --out DIR
--curve CSV` (see `--help`)."""

from flowopd.teachers import stage_main

if __name__ == "__main__":
    stage_main("baseline")
