"""The head's gRPC services: node sessions, the routing-table watch and the admin API."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from gridserve.common.errors import InvalidRequest
from gridserve.common.eventlog import event
from gridserve.common.service import cancel_and_wait
from gridserve.head.key_usage import KeyUsageBook
from gridserve.head.controller import Controller
from gridserve.head.node_registry import Session
from gridserve.head.pull_relay import pull_sessions, pull_source
from gridserve.head.route_table import RouteTable
from gridserve.v1 import head_pb2, head_pb2_grpc

log = logging.getLogger("gridserve.head")

HELLO_TIMEOUT = 10.0
# Full names of the services add_services registers (listed by server reflection).
SERVICE_NAMES = tuple(head_pb2.DESCRIPTOR.services_by_name[name].full_name
                      for name in ("NodeService", "RouteService", "AdminService"))


class NodeServicer(head_pb2_grpc.NodeServiceServicer):
    """One Session per scheduler: a hello, then reports in; desired states out."""

    def __init__(self, controller: Controller):
        self.ctl = controller

    async def Session(self, request_iterator, context):
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT)
        except (StopAsyncIteration, asyncio.TimeoutError):
            raise InvalidRequest("a node session must start with a hello") from None
        if first.WhichOneof("kind") != "hello":
            raise InvalidRequest("the first message of a node session must be a hello")
        session = self.ctl.open_session(first.hello, context.peer())
        reader = asyncio.create_task(self._read(request_iterator, session))
        reason = "session ended"
        try:
            while (desired := await session.next(reader)) is not None:
                yield desired
            reason = session.close_reason or self._reader_outcome(reader)
        except (asyncio.CancelledError, GeneratorExit):  # grpc cancels the task, or closes us at the yield
            reason = "session closed by the node"
            raise
        finally:
            await cancel_and_wait(reader)
            self.ctl.close_session(session, reason)

    async def _read(self, request_iterator, session: Session) -> None:
        async for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind == "report":
                self.ctl.on_report(session, msg.report)
            elif kind == "log_chunk":
                self.ctl.logs.deliver(session.node_id, msg.log_chunk)
            elif kind == "pull_progress":
                self.ctl.pulls.deliver(session.node_id, msg.pull_progress)
            else:
                event(log, "node_message_ignored", logging.WARNING, node=session.node_id,
                      kind=msg.WhichOneof("kind"))

    @staticmethod
    def _reader_outcome(reader: asyncio.Task) -> str:
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            return f"session broken: {reader.exception()}"
        return "session ended by the node"


class RouteServicer(head_pb2_grpc.RouteServiceServicer):
    """Watch: the current RoutingTable at once, then each new version. ReportLoad: a proxy's load, for
    the autoscaler."""

    def __init__(self, routes: RouteTable, controller: Controller | None = None):
        self.routes = routes
        self.ctl = controller
        self.key_usage = KeyUsageBook()

    async def ReportLoad(self, request: head_pb2.LoadReport, context) -> head_pb2.LoadReportAck:
        if not request.proxy_id:
            raise InvalidRequest("proxy_id must not be empty")
        if self.ctl is not None and self.ctl.autoscaler is not None:
            self.ctl.autoscaler.on_report(request)
        return head_pb2.LoadReportAck(others=self.key_usage.report(request.proxy_id, request.key_usage))

    async def Watch(self, request, context):
        peer = context.peer()  # read while the call is alive: grpc releases it when the call ends
        event(log, "route_watch_started", peer=peer, known_version=request.known_version)
        try:
            async for table in self.routes.watch():
                if context.done():  # the proxy went away (a cancelled or timed-out call): write nothing to it
                    return
                woke = time.monotonic()
                yield table
                if log.isEnabledFor(logging.DEBUG):  # where a change's propagation time goes (bench/scale.py)
                    event(log, "route_sent", logging.DEBUG, peer=peer, version=table.version, delta=table.delta,
                          after_change_ms=round((woke - self.routes.changed_at) * 1000),
                          write_ms=round((time.monotonic() - woke) * 1000))
        finally:
            event(log, "route_watch_ended", peer=peer)


class AdminServicer(head_pb2_grpc.AdminServiceServicer):
    """Deploy, Scale, Undeploy, Status, Models, Logs and Pull for the CLI, the proxy's metrics and tests."""

    def __init__(self, controller: Controller):
        self.ctl = controller

    async def Deploy(self, request: head_pb2.DeployRequest, context) -> head_pb2.DeployResponse:
        return head_pb2.DeployResponse(message=self.ctl.deploy(request.model, request.replicas, request.node,
                                                                      request.autoscaling_json))

    async def Scale(self, request: head_pb2.ScaleRequest, context) -> head_pb2.DeployResponse:
        return head_pb2.DeployResponse(message=self.ctl.scale(request.model, request.replicas))

    async def Models(self, request, context) -> head_pb2.ModelsResponse:
        return self.ctl.catalog_models()

    async def Logs(self, request: head_pb2.LogsRequest, context):
        """The replica's log file from its node: what is there, then (with follow) what is appended."""
        if not request.replica_id:
            raise InvalidRequest("replica_id must not be empty")
        session = self.ctl.log_session(request.replica_id, request.node)
        async for data in self.ctl.logs.stream(session, request.replica_id, request.follow, request.tail_lines):
            yield head_pb2.LogsResponse(data=data)

    async def Pull(self, request: head_pb2.PullRequest, context):
        """Each chosen node fetches the model into its HF cache; their progress, interleaved, until all end."""
        repo, revision = pull_source(self.ctl.catalog, request.model, request.revision)
        sessions = pull_sessions(self.ctl.nodes, request.node)
        async for progress in self.ctl.pulls.pull(sessions, repo, revision):
            yield progress

    async def Undeploy(self, request: head_pb2.UndeployRequest, context) -> head_pb2.UndeployResponse:
        return head_pb2.UndeployResponse(message=self.ctl.undeploy(request.model))

    async def Status(self, request, context) -> head_pb2.ClusterStatus:
        return self.ctl.status()


def add_services(server: grpc.aio.Server, controller: Controller, routes: RouteTable) -> None:
    head_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(controller), server)
    head_pb2_grpc.add_RouteServiceServicer_to_server(RouteServicer(routes, controller), server)
    head_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(controller), server)
