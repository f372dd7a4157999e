"""Stage `cold_start`: run by dvc.yaml as `python stages/cold_start.py --spec SPEC --base DIR --teacher NAME=DIR ...
--data DIR --out DIR` (see `--help`)."""

from flowopd.runtime.launch import pause_gc

if __name__ == "__main__":
    pause_gc()  # until torch and the model library have imported (see pause_gc)
    from flowopd.phases.cold_start import main

    main()
