"""Operator API for notifications (R20), mounted under /api/v1/ (hadash.api.urls):

    GET  /notification-channels              list (any user; URLs shortened for read-only)
    POST /notification-channels              create (admins)
    GET|PATCH|DELETE /notification-channels/{id}
    POST /notification-channels/{id}/test    queue a test delivery (admins), 202
    GET  /deliveries, /deliveries/{id}       what was sent, is pending or failed, and why

Same conventions as the rest of the API (hadash.api.views): bearer token or session,
admins write, errors are ``{"error": ...}`` and a rejected request changes nothing.
The secret is write-only: answers say only whether one is set.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Max
from django.urls import path
from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.validators import UniqueValidator

from hadash.api.filters import ListParams, WholeNumberField, apply_lookups
from hadash.api.views import E400, E401, E403, READ_ERRORS, WRITE_ERRORS, ApiView, _get
from hadash.choices import Transition
from hadash.permissions import is_admin

from . import channels, outbox
from .models import Channel, ChannelKind, Delivery, DeliveryState

NAME_RULE = ("1 to 100 characters: letters, digits, spaces, '.', '_' and '-', starting "
             "with a letter or digit")


class LastDeliverySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    transition = serializers.CharField()
    state = serializers.ChoiceField(choices=DeliveryState.choices)
    attempts = serializers.IntegerField()
    created = serializers.DateTimeField()
    sent_at = serializers.DateTimeField(allow_null=True)
    last_error = serializers.CharField()


class ChannelSerializer(serializers.ModelSerializer):
    name = serializers.RegexField(
        r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$", max_length=100, help_text=NAME_RULE,
        validators=[UniqueValidator(Channel.objects.all(),
                                    message="a channel with this name exists")],
        error_messages={"invalid": f"the name must be {NAME_RULE}"})
    url = serializers.CharField(
        required=False, allow_blank=True, max_length=2000,
        help_text="webhook/alertmanager: http(s) URL to POST to (no user:password, no "
        "#fragment). Shown to read-only users as scheme://host/… only.")
    recipients = serializers.ListField(
        child=serializers.CharField(max_length=254), required=False,
        max_length=channels.MAX_RECIPIENTS, help_text="email: the addresses.")
    secret = serializers.CharField(
        write_only=True, required=False, allow_blank=True, max_length=255,
        help_text="Key for the X-Hadash-Signature HMAC-SHA256 header (webhooks). "
        "Write-only; empty removes it.")
    has_secret = serializers.SerializerMethodField()
    kinds = serializers.ListField(
        child=serializers.CharField(max_length=64), required=False,
        max_length=channels.MAX_LIST, help_text="Alert kinds to send (empty: all).")
    clusters = serializers.ListField(
        child=serializers.CharField(max_length=255), required=False,
        max_length=channels.MAX_LIST, help_text="Clusters to send (empty: all).")
    last_delivery = serializers.SerializerMethodField()

    class Meta:
        model = Channel
        fields = ["id", "name", "kind", "url", "recipients", "secret", "has_secret",
                  "enabled", "min_severity", "kinds", "clusters", "created", "updated",
                  "last_delivery"]
        read_only_fields = ["id", "created", "updated"]

    def get_has_secret(self, obj) -> bool:
        return bool(obj.secret)

    @extend_schema_field(LastDeliverySerializer(allow_null=True))
    def get_last_delivery(self, obj):
        last = self.context.get("last", {})
        d = last[obj.pk] if obj.pk in last else (
            obj.deliveries.order_by("-id").first())
        if d is None:
            return None
        return LastDeliverySerializer({
            "id": d.pk, "transition": d.transition, "state": d.state,
            "attempts": d.attempts, "created": d.created, "sent_at": d.sent_at,
            "last_error": d.last_error}).data

    def validate(self, attrs):
        channel = Channel(**{f: getattr(self.instance, f) for f in
                             ("pk", "name", "kind", "url", "recipients", "secret", "enabled",
                              "min_severity", "kinds", "clusters")}) \
            if self.instance else Channel()
        for k, v in attrs.items():
            setattr(channel, k, v)
        try:
            channels.clean(channel)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict) from None
        attrs.update(url=channel.url or "", recipients=channel.recipients,
                     kinds=channel.kinds, clusters=channel.clusters)
        return attrs

    def to_representation(self, instance):
        data = super().to_representation(instance)
        request = self.context.get("request")
        if request is None or not is_admin(request.user):
            data["url"] = instance.target if instance.kind != ChannelKind.EMAIL else ""
        return data


class DeliverySerializer(serializers.ModelSerializer):
    channel_name = serializers.CharField(source="channel.name", read_only=True)

    class Meta:
        model = Delivery
        fields = ["id", "channel", "channel_name", "alert", "transition", "state",
                  "attempts", "next_attempt", "last_error", "idempotency_key", "created",
                  "sent_at"]
        read_only_fields = fields


class DeliveryDetailSerializer(DeliverySerializer):
    class Meta(DeliverySerializer.Meta):
        fields = [*DeliverySerializer.Meta.fields, "payload"]
        read_only_fields = fields


class DeliveryParams(ListParams):
    limit = WholeNumberField(min_value=1, max_value=1000, default=100,
                                     help_text="At most this many (default 100, max 1000).")
    channel = WholeNumberField(min_value=1, max_value=2**63 - 1, required=False,
                                       help_text="Channel id.")
    state = serializers.ChoiceField(choices=DeliveryState.choices, required=False)
    transition = serializers.ChoiceField(choices=Transition.choices, required=False)
    alert = WholeNumberField(min_value=1, max_value=2**63 - 1, required=False,
                                     help_text="Alert id.")

    lookups = {"channel": "channel_id", "state": "state", "transition": "transition",
               "alert": "alert_id"}


def last_deliveries(channel_ids) -> dict[int, Delivery]:
    ids = (Delivery.objects.filter(channel_id__in=channel_ids).values("channel_id")
           .annotate(m=Max("id")).values_list("m", flat=True))
    found = {d.channel_id: d for d in Delivery.objects.filter(id__in=list(ids))}
    return {pk: found.get(pk) for pk in channel_ids}


def _channel(pk: int) -> Channel:
    return _get(Channel.objects, f"no notification channel {pk}", pk=pk)


class ChannelListView(ApiView):
    serializer_class = ChannelSerializer

    @extend_schema(summary="List notification channels (R20)", parameters=[ListParams],
                   responses={200: ChannelSerializer(many=True), 400: E400, 401: E401})
    def get(self, request):
        p = self.params(ListParams)
        rows = list(Channel.objects.order_by("name")[p["offset"]: p["offset"] + p["limit"]])
        ctx = {"request": request, "last": last_deliveries([c.pk for c in rows])}
        return Response(ChannelSerializer(rows, many=True, context=ctx).data)

    @extend_schema(
        summary="Create a notification channel",
        description="kind webhook (generic JSON, signed when a secret is set), alertmanager "
        "(Alertmanager webhook v4 body) or email (recipients; SMTP from the server's "
        "environment). Filter: min_severity, kinds, clusters (empty lists: all). Writes a "
        "`ChannelCreated` event.",
        request=ChannelSerializer,
        responses={201: ChannelSerializer, 400: E400, 401: E401, 403: E403})
    def post(self, request):
        ser = ChannelSerializer(data=request.data, context={"request": request})
        ser.is_valid(raise_exception=True)
        channel = channels.save(Channel(**ser.validated_data), by=self.by(),
                                now=timezone.now())
        return Response(ChannelSerializer(channel, context={"request": request}).data,
                        status=status.HTTP_201_CREATED)


class ChannelDetailView(ApiView):
    serializer_class = ChannelSerializer

    @extend_schema(summary="Show a notification channel",
                   responses={200: ChannelSerializer, **READ_ERRORS})
    def get(self, request, pk: int):
        return Response(ChannelSerializer(_channel(pk), context={"request": request}).data)

    @extend_schema(summary="Change a notification channel",
                   description="Only the fields given change (`secret` too: leave it out to "
                   "keep it). Writes a `ChannelChanged` event naming the fields.",
                   request=ChannelSerializer,
                   responses={200: ChannelSerializer, **WRITE_ERRORS})
    def patch(self, request, pk: int):
        channel = _channel(pk)
        ser = ChannelSerializer(channel, data=request.data, partial=True,
                                context={"request": request})
        ser.is_valid(raise_exception=True)
        for k, v in ser.validated_data.items():
            setattr(channel, k, v)
        channels.save(channel, by=self.by(), now=timezone.now(),
                      secret_changed="secret" in ser.validated_data)
        return Response(ChannelSerializer(_channel(pk), context={"request": request}).data)

    @extend_schema(summary="Delete a notification channel (and its deliveries)",
                   request=None, responses={204: None, **WRITE_ERRORS})
    def delete(self, request, pk: int):
        channels.delete(_channel(pk), by=self.by(), now=timezone.now())
        return Response(status=status.HTTP_204_NO_CONTENT)


class ChannelTestView(ApiView):
    serializer_class = DeliverySerializer

    @extend_schema(
        summary="Send a test notification",
        description="Queues a `test` delivery to this channel, whatever its filter and even "
        "when disabled; the engine sends it within a second or two. Follow its state at "
        "/api/v1/deliveries/{id}. Writes a `NotificationTest` event.",
        request=None, responses={202: DeliverySerializer, **WRITE_ERRORS})
    def post(self, request, pk: int):
        channel = _channel(pk)
        delivery = outbox.enqueue_test(channel, now=timezone.now(), by=self.by())
        return Response(DeliverySerializer(delivery).data, status=status.HTTP_202_ACCEPTED)


class DeliveryListView(ApiView):
    serializer_class = DeliverySerializer

    @extend_schema(summary="List notification deliveries, newest first",
                   parameters=[DeliveryParams],
                   responses={200: DeliverySerializer(many=True), 400: E400, 401: E401})
    def get(self, request):
        p = self.params(DeliveryParams)
        qs = apply_lookups(Delivery.objects.select_related("channel").order_by("-id"), p,
                           DeliveryParams.lookups)
        rows = qs[p["offset"]: p["offset"] + p["limit"]]
        return Response(DeliverySerializer(rows, many=True).data)


class DeliveryDetailView(ApiView):
    serializer_class = DeliveryDetailSerializer

    @extend_schema(summary="Show a notification delivery (with what is sent)",
                   responses={200: DeliveryDetailSerializer, **READ_ERRORS})
    def get(self, request, pk: int):
        d = _get(Delivery.objects.select_related("channel"), f"no delivery {pk}", pk=pk)
        return Response(DeliveryDetailSerializer(d).data)


urlpatterns = [
    path("notification-channels", ChannelListView.as_view(), name="notification-channel-list"),
    path("notification-channels/<int:pk>", ChannelDetailView.as_view(),
         name="notification-channel-detail"),
    path("notification-channels/<int:pk>/test", ChannelTestView.as_view(),
         name="notification-channel-test"),
    path("deliveries", DeliveryListView.as_view(), name="delivery-list"),
    path("deliveries/<int:pk>", DeliveryDetailView.as_view(), name="delivery-detail"),
]
