"""The sweep: Ray Tune driver, the trial's Ray glue, the search space, progress and state mending."""
