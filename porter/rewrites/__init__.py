"""One libcst transformer per concern; `porter.pipeline.REWRITES` lists them in the order they run."""
