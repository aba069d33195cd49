from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [
        migrations.CreateModel(
            name="Currency",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("code", models.CharField(max_length=3, unique=True)),
                ("rate", models.FloatField()),
                ("version", models.IntegerField(default=1)),
            ],
        ),
    ]
