from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("dispatch", "0006_models_move_to_availability_tracking_analytics"),
    ]

    operations = [
        migrations.AddField(
            model_name="delivery",
            name="auto_dispatch",
            field=models.BooleanField(default=True),
        ),
    ]
