"""Stage `cold_start`: run by dvc.yaml as `python stages/cold_start.py --spec SPEC --base DIR --teacher NAME=DIR ...
--data DIR --out DIR` (see `--help`)."""

from flowopd.cold_start import stage_main

if __name__ == "__main__":
    stage_main()
