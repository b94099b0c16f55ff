"""HTTP routes, one module per resource; each validates, delegates to worker/, returns."""
