"""Running a sweep, in the parent process: pre-flight checks, the run folder, the sweep and
pruning loops, progress, backends."""
