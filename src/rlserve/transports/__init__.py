"""Transport backends. Each file knows how requests travel and how callers wake."""
