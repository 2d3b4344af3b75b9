"""Pure domain logic of stackml: job spec, states, errors, metric protocol (no I/O)."""
