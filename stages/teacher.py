"""Stage `teacher`: run by dvc.yaml as `python stages/teacher.py --spec SPEC --teacher NAME --base DIR --data DIR
--out DIR --curve CSV` (see `--help`)."""

from flowopd.runtime.launch import pause_gc

if __name__ == "__main__":
    pause_gc()  # until torch and the model library have imported (see pause_gc)
    from flowopd.phases.teacher import main

    main()
