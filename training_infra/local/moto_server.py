"""The local AWS server: moto, taught five AWS behaviours the project relies on.

CloudFormation creates an `AWS::EC2::Instance` that names only a launch template (and version)
from that template: its image, type, user data, tags and market. moto 5 reads a literal `ImageId`
from the resource instead and ignores the template, so the seed's `create_instance=true` instance
(which takes everything from its run's launch template version 1, docs/architecture.md,
"A redeploy never replaces a running instance") could not be created locally. This shim launches
such an instance through moto's own RunInstances with the template, as AWS does; every other
resource and call is moto's, unchanged. Used only by training_infra/local/emulator.py.

Second (`teach_instance_profiles`): an instance launched from a launch template (RunInstances or an
EC2 Fleet) carries the template's instance profile, as on AWS; moto 5 drops it. The supervisor
terminates only instances with the project's profile (docs/architecture.md, "Trust boundaries").

Third (`teach_default_versions`): a CloudFormation update of a launch template makes the new version
the default, as AWS does (moto 5 leaves it at 1); runs copy the default version only.

Fourth (`teach_fleet_client_tokens`): CreateFleet is idempotent by ClientToken, as on AWS.

Fifth (`teach_loopback_addresses`, the sandbox only, `TI_LOCAL_ADDRESS_BLOCK`): each instance's private
address is a loopback address of its own, where the sandbox serves its IMDS (training_infra/local/sandbox.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from moto.ec2.models.instances import Instance

_moto_create = Instance.create_from_cloudformation_json


def _create_from_launch_template(
    cls: type[Instance], resource_name: str, cloudformation_json: Any, account_id: str, region_name: str, **kwargs: Any
) -> Instance:
    properties = cloudformation_json["Properties"]
    template = properties.get("LaunchTemplate")
    if "ImageId" in properties or not template:
        return _moto_create.__func__(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs)
    from moto.ec2.models import ec2_backends

    backend = ec2_backends[account_id][region_name]
    spec = {"LaunchTemplateId": template["LaunchTemplateId"], "Version": str(template.get("Version", "$Default"))}
    data = backend._get_template_from_args(spec).data
    reservation = backend.run_instances(
        image_id="",  # from the template, as AWS does
        count=1,
        user_data=None,
        security_group_names=[],
        instance_type="m1.small",
        is_instance_type_default=True,
        subnet_id=properties.get("SubnetId"),
        launch_template=spec,
        instance_market_options=data.get("InstanceMarketOptions"),
    )
    instance = reservation.instances[0]
    for tag in properties.get("Tags", []):
        instance.add_tag(tag["Key"], tag["Value"])
    return instance


def teach_instance_profiles() -> None:
    """Instances launched from a template get its IamInstanceProfile (idempotent; in-process tests call it too)."""
    from moto.ec2.models.instances import InstanceBackend

    if getattr(InstanceBackend.run_instances, "_with_profiles", False):
        return
    moto_run = InstanceBackend.run_instances

    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        reservation = moto_run(self, *args, **kwargs)
        template = kwargs.get("launch_template")
        if not template or kwargs.get("iam_instance_profile_arn") or kwargs.get("iam_instance_profile_name"):
            return reservation
        profile = self._get_template_from_args(template).data.get("IamInstanceProfile") or {}
        if profile.get("Arn") or profile.get("Name"):
            for instance in reservation.instances:
                if instance.id not in self.iam_instance_profile_associations:
                    self.associate_iam_instance_profile(
                        instance.id, iam_instance_profile_name=profile.get("Name"),
                        iam_instance_profile_arn=profile.get("Arn"),
                    )  # fmt: skip
        return reservation

    run_instances._with_profiles = True  # type: ignore[attr-defined]
    InstanceBackend.run_instances = run_instances  # type: ignore[method-assign]

    from moto.ec2.models.fleets import FleetsBackend

    moto_fleet = FleetsBackend.create_fleet

    def create_fleet(self: Any, *args: Any, **kwargs: Any) -> Any:
        fleet = moto_fleet(self, *args, **kwargs)
        instances = [r.instance for r in fleet.spot_requests if getattr(r, "instance", None)]
        instances += [d["instance"] for d in fleet.on_demand_instances]
        # Every spec of the project's fleets comes from one launch template: one profile.
        profile = next((spec.iam_instance_profile for spec in fleet.launch_specs if spec.iam_instance_profile), {})
        if isinstance(profile.get("Arn"), dict):  # moto wraps the template's {"Arn": ...} once more
            profile = profile["Arn"]
        for instance in instances:
            if (
                profile.get("Arn") or profile.get("Name")
            ) and instance.id not in self.iam_instance_profile_associations:
                self.associate_iam_instance_profile(
                    instance.id,
                    iam_instance_profile_name=profile.get("Name"),
                    iam_instance_profile_arn=profile.get("Arn"),
                )
        return fleet

    FleetsBackend.create_fleet = create_fleet  # type: ignore[method-assign]


def teach_default_versions() -> None:
    from moto.ec2.models.launch_templates import LaunchTemplate

    moto_update = LaunchTemplate.update_from_cloudformation_json

    def update(cls: Any, original_resource: Any, *args: Any, **kwargs: Any) -> Any:
        template = moto_update.__func__(cls, original_resource, *args, **kwargs)
        template.default_version_number = template.latest_version_number
        return template

    LaunchTemplate.update_from_cloudformation_json = classmethod(update)  # type: ignore[method-assign]


def teach_fleet_client_tokens() -> None:
    """CreateFleet is idempotent by ClientToken, as on AWS: a second request with a token already used gets the
    first one's answer (its fleet and instances), not a second instance. moto 5 ignores the token, so a launch
    request and the supervisor's reconcile claiming the same attempt at once started two instances here."""
    import threading

    from moto.ec2.responses.fleets import Fleets

    moto_create = Fleets.create_fleet
    answered: dict[tuple[str, str, str], Any] = {}
    lock = threading.Lock()

    def create_fleet(self: Any) -> Any:
        token = self._get_param("ClientToken")
        if not token or self._get_param("DryRun"):
            return moto_create(self)
        key = (self.current_account, self.region, token)
        with lock:  # the server answers requests on threads
            if key not in answered:
                answered[key] = moto_create(self)
            return answered[key]

    Fleets.create_fleet = create_fleet  # type: ignore[method-assign]


ADDRESS_BLOCK_VARIABLE = "TI_LOCAL_ADDRESS_BLOCK"


def teach_loopback_addresses(block: str) -> None:
    """Each instance's private address is its own loopback address, `<block>.<x>.<y>` (block `127.N`): the
    sandbox serves the instance's IMDS there and its trainer can bind it, so DescribeInstances, IMDS's
    `local-ipv4` and the address a multi-node peer connects to are one. moto gives subnet addresses
    (10.x) that no process on this machine can listen on."""
    import itertools
    import threading

    from moto.ec2.models.instances import InstanceBackend

    numbers = itertools.count(1)
    lock = threading.Lock()
    moto_run = InstanceBackend.run_instances

    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        reservation = moto_run(self, *args, **kwargs)
        for instance in reservation.instances:
            with lock:
                number = next(numbers)
            address = f"{block}.{number // 254 % 256}.{number % 254 + 1}"
            instance.nics[0].private_ip_address = address
        return reservation

    InstanceBackend.run_instances = run_instances  # type: ignore[method-assign]


def main() -> None:
    Instance.create_from_cloudformation_json = classmethod(_create_from_launch_template)  # type: ignore[method-assign]
    teach_instance_profiles()
    teach_default_versions()
    teach_fleet_client_tokens()
    if block := os.environ.get(ADDRESS_BLOCK_VARIABLE):
        teach_loopback_addresses(block)
    from moto.server import main as serve

    sys.exit(serve())


if __name__ == "__main__":
    main()
