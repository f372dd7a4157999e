"""Stage `opd`: run by dvc.yaml as `python stages/opd.py --spec SPEC --init DIR --base DIR --teacher NAME=DIR ...
--data DIR --out DIR --curve CSV` (see `--help`)."""

from flowopd.opd import stage_main

if __name__ == "__main__":
    stage_main()
