"""The evaluation grid, split along its seams: `cells` (keys and the store), `runner` (one cell through
Lightning's predict loop), `metrics` (the registry), `results` (grid files), `loggers` (W&B) and
`grid` (the loop over targets x methods x strengths x seeds)."""
