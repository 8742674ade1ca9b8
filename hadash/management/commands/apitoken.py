"""`python manage.py apitoken USERNAME [--create]`: print a new operator API token
(PROTOCOL.md, Operator API). Only its hash is stored; the token is shown once."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from hadash.models import ApiToken


class Command(BaseCommand):
    help = "Print a new operator API token for USERNAME (use as 'Authorization: Bearer <token>')."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--create",
            action="store_true",
            help="Create the user (as staff, without a password) if it does not exist.",
        )

    def handle(self, *args, username: str, create: bool = False, **options):
        User = get_user_model()
        with transaction.atomic():
            user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
            if user is None:
                if not create:
                    raise CommandError(
                        f"no user named {username!r}; create it with --create (as staff) "
                        "or with createsuperuser"
                    )
                user = User.objects.create_user(**{User.USERNAME_FIELD: username})
                user.is_staff = True
                user.set_unusable_password()
                user.save()
                self.stderr.write(f"created staff user {username!r}")
            elif not user.is_active:
                raise CommandError(f"user {username!r} is inactive; its tokens would be refused")
            _, key = ApiToken.issue(user)
        self.stdout.write(key)
