"""One model process: starting it (spawned, or forked from a warm template), its pipes
and lines, /proc, reaping."""
