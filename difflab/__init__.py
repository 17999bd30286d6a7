"""What the entry points share and no method needs: the project's error types, config checks, safe checkpoint
writes, the run-directory lock and interrupt handling."""
