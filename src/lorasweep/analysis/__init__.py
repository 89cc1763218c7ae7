"""Statistics, explanations, plots and the report over stored trials. Never imports torch."""
