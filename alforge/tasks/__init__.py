"""Prefect tasks: thin wrappers that read inputs from the store, call the science modules
(mlip, exploration, selectors, labelling) and write results back. Each is idempotent: it first
looks in the store for its own finished result, so a re-run resumes instead of recomputing."""
