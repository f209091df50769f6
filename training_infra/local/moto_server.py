"""The local AWS server: moto, taught one AWS behaviour the project relies on.

CloudFormation creates an `AWS::EC2::Instance` that names only a launch template (and version)
from that template: its image, type, user data, tags and market. moto 5 reads a literal `ImageId`
from the resource instead and ignores the template, so the seed's `create_instance=true` instance
(which takes everything from its run's launch template version 1, docs/architecture.md,
"A redeploy never replaces a running instance") could not be created locally. This shim launches
such an instance through moto's own RunInstances with the template, as AWS does; every other
resource and call is moto's, unchanged. Used only by training_infra/local/emulator.py.
"""

from __future__ import annotations

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


def main() -> None:
    Instance.create_from_cloudformation_json = classmethod(_create_from_launch_template)  # type: ignore[method-assign]
    from moto.server import main as serve

    sys.exit(serve())


if __name__ == "__main__":
    main()
