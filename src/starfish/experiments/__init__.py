"""The verbs (run, compare, diagnose, demo, evaluate) and their orchestration: config resolution, steps, pipeline choice."""
