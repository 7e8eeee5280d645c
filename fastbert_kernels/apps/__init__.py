"""Applications built on the library, which never imports them: the command line, the demo and
end-to-end benchmark, the benchmark harness, and the packaged data sets they use."""
