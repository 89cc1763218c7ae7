"""Commands beside the sweep: the estimator, adapter spectra and their verification, the
starter spec."""
