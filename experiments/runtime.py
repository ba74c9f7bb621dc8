"""The experiments' runtime, in one place: how a study's program starts and TensorFlow Federated's execution
context. Both come from tff_programs (its binaries' start-up, `tff_programs.launch`, and its context with worker
failover, `tff_programs.contexts`); the experiments reach them only through here, so a change there touches
this module alone. TFF is imported only when a context is asked for (a study that attacks does not load it)."""


def run(main):
    """Runs an absl `main` as the tff_programs binaries do: flags first (a bad flag is one `error:` line), then
    TensorFlow, then `main`."""
    from tff_programs import launch

    launch.run(main)


def _contexts():
    from tff_programs import contexts

    return contexts


def install_context(**options):
    """Installs TFF's execution context (local, or on `workers=[...]`); returns it (tff_programs.contexts)."""
    return _contexts().install_context(**options)


def shutdown():
    """Stops the installed context's C++ worker processes."""
    return _contexts().shutdown()


def worker_processes():
    """The local context's worker processes (psutil.Process), for their memory."""
    return _contexts().worker_processes()


def parse_address(address):
    return _contexts().parse_address(address)


def connect(address, timeout):
    """A channel to a TFF worker at `address`, once it accepts connections."""
    return _contexts().connect(address, timeout=timeout)


def stop_processes(processes):
    return _contexts().stop_processes(processes)
