"""The xwhep worker: host probe, activation policies, stage-in/stage-out, cgroups and job executors."""
