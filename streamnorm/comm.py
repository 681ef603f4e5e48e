"""Communicators: the one collective that synchronized layers need.

A communicator is any object with an integer ``rank``, an integer ``size`` and a method
``allgather(obj) -> list`` that returns, on every rank, the list of every rank's
``obj`` in rank order.  That is all :class:`~streamnorm.layers.sync.SyncBatchNorm`
asks of the transport, so the layer runs on MPI (:class:`MPICommunicator`), on one
process (:class:`SelfCommunicator`), or on anything else with those three members:
an mpi4py communicator itself qualifies, and the tests simulate ranks with threads.

The payloads are small Python objects (tuples of per-channel float64 vectors), so the
pickle-based ``allgather`` of mpi4py is the right tool: a synchronized BatchNorm sends
O(C) numbers per step, and at that size the latency of the collective, not its
bandwidth, is the cost.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "Communicator",
    "MPICommunicator",
    "RankFailure",
    "SelfCommunicator",
    "allgather_checked",
    "as_communicator",
]


@runtime_checkable
class Communicator(Protocol):
    """What a synchronized layer needs from its transport.

    Attributes
    ----------
    rank : int
        This process's index, ``0 <= rank < size``.
    size : int
        The number of processes taking part.

    Examples
    --------
    The protocol is checked by structure, not by inheritance:

    >>> isinstance(SelfCommunicator(), Communicator)
    True
    >>> isinstance(object(), Communicator)
    False
    """

    rank: int
    size: int

    def allgather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank (a collective call)."""
        ...


class SelfCommunicator:
    """The communicator of a single process: ``size`` 1, ``allgather(obj) == [obj]``.

    With it a synchronized layer is exactly the plain layer, without MPI installed.

    Examples
    --------
    >>> comm = SelfCommunicator()
    >>> comm.rank, comm.size, comm.allgather({"n": 3})
    (0, 1, [{'n': 3}])
    """

    rank = 0
    size = 1

    def allgather(self, obj: Any) -> list:
        """Return ``[obj]``."""
        return [obj]

    def __repr__(self) -> str:
        return "SelfCommunicator()"


class MPICommunicator:
    """An mpi4py communicator seen through the :class:`Communicator` protocol.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The communicator to use; ``MPI.COMM_WORLD`` when None.  mpi4py is imported
        here, not when streamnorm is imported (``pip install 'streamnorm[mpi]'``).

    Notes
    -----
    ``allgather`` is mpi4py's pickle-based ``Comm.allgather``.  Every rank must make
    the same collective calls in the same order: a rank that skips one (a train-mode
    forward on one rank and an eval-mode forward on another, say) leaves the others
    waiting for ever, as with any MPI program.

    Examples
    --------
    In a script started with ``mpiexec -n 2 python script.py``, every rank sees every
    rank's object:

    >>> comm = MPICommunicator()                   # doctest: +SKIP
    >>> comm.allgather(comm.rank)                  # doctest: +SKIP
    [0, 1]
    """

    def __init__(self, comm=None) -> None:
        try:
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "MPICommunicator needs mpi4py and an MPI library: pip install 'streamnorm[mpi]'"
            ) from exc
        self.comm = MPI.COMM_WORLD if comm is None else comm

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    def allgather(self, obj: Any) -> list:
        """Every rank's ``obj`` in rank order (``MPI.Comm.allgather``)."""
        return list(self.comm.allgather(obj))

    def __repr__(self) -> str:
        return f"MPICommunicator(rank={self.rank}, size={self.size})"


def as_communicator(comm) -> Communicator:
    """``comm`` itself if it has ``rank``, ``size`` and ``allgather``; None gives a
    :class:`SelfCommunicator`; anything else raises ``TypeError``.

    Examples
    --------
    >>> as_communicator(None)
    SelfCommunicator()

    Any object with the three members will do, a stand-in for two ranks for instance:

    >>> class Pretend:
    ...     rank, size = 1, 2
    ...     def allgather(self, obj):
    ...         return ["rank 0's object", obj]
    >>> as_communicator(Pretend()).allgather("mine")
    ["rank 0's object", 'mine']
    >>> as_communicator("localhost")
    Traceback (most recent call last):
    ...
    TypeError: a communicator needs rank, size and allgather(obj) -> list; got str
    """
    if comm is None:
        return SelfCommunicator()
    if isinstance(comm, Communicator):
        return comm
    raise TypeError(
        f"a communicator needs rank, size and allgather(obj) -> list; got {type(comm).__name__}"
    )


class RankFailure(NamedTuple):
    """Sent in place of a payload by a rank whose local work raised.

    The other ranks receive it from the same collective and raise too, so an error on
    one rank stops every rank instead of leaving them waiting in the next collective.

    Examples
    --------
    >>> RankFailure(1, "ValueError: bad shape")
    RankFailure(rank=1, message='ValueError: bad shape')
    """

    rank: int
    message: str


def allgather_checked(comm: Communicator, payload: Any, error: BaseException | None = None, what: str = "collective") -> list:
    """``comm.allgather(payload)``, raising on every rank if any rank failed.

    Parameters
    ----------
    comm : Communicator
    payload : object
        This rank's contribution; ignored when ``error`` is given.
    error : exception, optional
        This rank's local work raised ``error``: a :class:`RankFailure` is sent in
        place of the payload, and ``error`` is raised here after the exchange.
    what : str
        What was being done, for the message the other ranks raise.

    Returns
    -------
    list
        The payloads of every rank, in rank order.

    Raises
    ------
    RuntimeError
        On the ranks that did not fail, when another rank did (the message names the
        rank and its error); the failing rank raises its own ``error``.

    Examples
    --------
    >>> allgather_checked(SelfCommunicator(), (3, 4.5))
    [(3, 4.5)]

    Seen from rank 0 of two, when rank 1's local work failed:

    >>> class TwoRanks:
    ...     rank, size = 0, 2
    ...     def allgather(self, obj):
    ...         return [obj, RankFailure(1, "ValueError: dy has the wrong shape")]
    >>> allgather_checked(TwoRanks(), "fine", what="backward")
    Traceback (most recent call last):
    ...
    RuntimeError: backward failed on another rank (rank 1: ValueError: dy has the wrong shape)
    """
    sent = payload if error is None else RankFailure(int(comm.rank), f"{type(error).__name__}: {error}")
    got = list(comm.allgather(sent))
    if error is not None:
        raise error
    if len(got) != comm.size:
        raise RuntimeError(f"{what}: allgather returned {len(got)} items for {comm.size} ranks")
    failed = [g for g in got if isinstance(g, RankFailure)]
    if failed:
        detail = "; ".join(f"rank {f.rank}: {f.message}" for f in failed)
        raise RuntimeError(f"{what} failed on another rank ({detail})")
    return got
