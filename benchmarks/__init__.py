"""glm-jax benchmarks: `python benchmarks/run.py CASE` appends measurements to a JSON-lines file,
`python benchmarks/run.py report` turns them into the README's Performance tables and plots."""
