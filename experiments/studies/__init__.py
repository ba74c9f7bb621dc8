"""Studies: what the attacks recover, under which threat, and what each defence costs in accuracy."""
