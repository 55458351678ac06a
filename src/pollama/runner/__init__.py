"""Everything that imports ``llama_cpp`` lives here, and runs in child processes."""
