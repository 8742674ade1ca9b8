from django.apps import AppConfig


class HadashConfig(AppConfig):
    name = "hadash"
    verbose_name = "HA manager"
