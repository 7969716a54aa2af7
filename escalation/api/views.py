"""Thin views: validate, call one service or selector, render (STYLE rule 2)."""
from __future__ import annotations

from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from common.actors import Actor
from common.pagination import paginate, paginated_schema
from common.permissions import IsOps, IsSupport
from common.schema import PAGE_PARAMETERS, errors
from escalation import selectors, tickets
from escalation.api import serializers as s
from workflows import escalations

PAGE = PAGE_PARAMETERS


def _query(serializer_class, request) -> dict:
    q = serializer_class(data=request.query_params)
    q.is_valid(raise_exception=True)
    return q.validated_data


class UnassignedOrderListView(APIView):
    permission_classes = [IsOps]

    @extend_schema(
        operation_id="admin_unassigned_orders_list", parameters=[s.UnassignedOrderQuerySerializer, *PAGE],
        responses={200: paginated_schema("UnassignedOrderPage", "orders", s.UnassignedOrderSerializer,
                                         summary=s.UnassignedSummarySerializer()), **errors(400)},
        tags=["escalation"],
    )
    def get(self, request):
        q = _query(s.UnassignedOrderQuerySerializer, request)
        qs = selectors.unassigned_orders_list(
            state=q["state"], level=q.get("escalationLevel"), failure_reason=q.get("failureReason"),
            status=q.get("escalationStatus"),
        )
        summary = selectors.unassigned_orders_summary(qs)
        return paginate(request, qs, s.UnassignedOrderSerializer, key="orders",
                        ordering=("first_attempt_at", "id"), extra={"summary": summary})


class EscalateView(APIView):
    permission_classes = [IsOps]

    @extend_schema(
        operation_id="admin_unassigned_orders_escalate", request=s.EscalateSerializer,
        responses={200: s.EscalateResponseSerializer, **errors(400, 404, 409)}, tags=["escalation"],
    )
    def post(self, request, order_id):
        data = s.EscalateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        done = escalations.unassigned_escalate(
            record_id=order_id, level=v["level"], reason=v["reason"], notes=v["notes"],
            actor=Actor.for_user(request.user), user=request.user,
        )
        body = {"success": True, "escalatedAt": done.record.escalated_at, "newEscalationLevel": done.level}
        if done.record.support_ticket_id:
            body["supportTicketId"] = done.record.support_ticket_id
        return Response(s.EscalateResponseSerializer(body).data)


class EscalationCheckView(APIView):
    permission_classes = [IsOps]

    @extend_schema(operation_id="admin_escalation_check", request=None,
                   responses={200: s.EscalationCheckResponseSerializer, **errors()}, tags=["escalation"])
    def post(self, request):
        now = timezone.now()
        result = escalations.escalation_check(now=now)
        return Response(s.EscalationCheckResponseSerializer({"success": True, "checkedAt": now, **result.as_dict()}).data)


class TicketListView(APIView):
    permission_classes = [IsSupport]

    @extend_schema(
        operation_id="support_tickets_list", parameters=[s.TicketQuerySerializer, *PAGE],
        responses={200: paginated_schema("SupportTicketPage", "tickets", s.TicketSerializer), **errors(400)},
        tags=["support"],
    )
    def get(self, request):
        q = _query(s.TicketQuerySerializer, request)
        qs = selectors.tickets_queue(
            status=q["status"], priority=q.get("priority"), zone_id=q.get("zoneId"), level=q.get("escalationLevel"),
            assignee=request.user if q["mine"] else None, unassigned_only=q["unassigned"],
        )
        return paginate(request, qs, s.TicketSerializer, key="tickets", ordering=selectors.QUEUE_ORDERING, keyset=True)


def _detail(ticket_id) -> dict:
    ticket = selectors.ticket_get(ticket_id=ticket_id)
    comments = selectors.ticket_comments(ticket_id=ticket.pk)
    return s.TicketDetailSerializer(ticket, context={"comments": comments}).data


class TicketDetailView(APIView):
    permission_classes = [IsSupport]

    @extend_schema(operation_id="support_tickets_retrieve", responses={200: s.TicketDetailSerializer, **errors(404)},
                   tags=["support"])
    def get(self, request, ticket_id):
        return Response(_detail(ticket_id))

    @extend_schema(operation_id="support_tickets_update", request=s.TicketPatchSerializer,
                   responses={200: s.TicketDetailSerializer, **errors(400, 404, 409)}, tags=["support"])
    def patch(self, request, ticket_id):
        data = s.TicketPatchSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        changes = dict(data.validated_data)
        if "assigneeId" in changes:
            changes["assignee_id"] = changes.pop("assigneeId")
        tickets.ticket_update(ticket_id=ticket_id, user=request.user, actor=Actor.for_user(request.user), **changes)
        return Response(_detail(ticket_id))


class TicketCommentsView(APIView):
    permission_classes = [IsSupport]

    @extend_schema(operation_id="support_tickets_comments_create", request=s.CommentCreateSerializer,
                   responses={201: s.CommentSerializer, **errors(400, 404, 409)}, tags=["support"])
    def post(self, request, ticket_id):
        data = s.CommentCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        comment = tickets.ticket_comment(
            ticket_id=ticket_id, user=request.user, actor=Actor.for_user(request.user), body=data.validated_data["body"]
        )
        return Response(s.CommentSerializer(comment).data, status=status.HTTP_201_CREATED)
