"""The `vnm` command's jobs (prune, recover, export, info, profile, select) and what they read: the built-in model
and texts, perplexity. The library (vnmsparse.*) never imports from here."""
