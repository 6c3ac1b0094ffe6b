"""The benchmark suite behind `postcopy bench`: scenarios, links, limits, runs, plots."""
