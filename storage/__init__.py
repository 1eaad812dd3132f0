"""Settings and the SQL store of jobs, prompts and outputs."""
