"""Local inference engine for Mistral Small 3.1 24B Instruct (2503)."""
