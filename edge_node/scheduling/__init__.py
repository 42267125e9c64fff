"""Time division: training windows, training jobs and the scheduler that runs them.

- :mod:`.windows` -- when training may take which fraction of which card
- :mod:`.config` -- the ``scheduling`` section of the node config
- :mod:`.jobs` -- the job registry, its durable states and the job protocol
- :mod:`.scheduler` -- starts, preempts and resumes jobs by window and load
- :mod:`.jobkit` -- the job side of the protocol (checkpoints, SIGTERM, progress)
- :mod:`.example_job` -- a real numpy training job that checkpoints and resumes

Nothing is imported here, so a job process that uses :mod:`.jobkit` stays light.
See docs/scheduling.md.
"""
