"""Start the internvl node.

    ros2 launch internvl_ros internvl.launch.py model_dir:=/path/to/model \\
        image_topic:=/camera/image_raw
    ros2 launch internvl_ros internvl.launch.py server_url:=http://192.168.1.20:8000/v1

Arguments: params_file (default: the package's config/internvl.yaml), namespace, backend,
model_dir, hf_model, vit_model, server_url, server_model (override the YAML when given) and
image_topic (remaps the node's relative ``image_raw`` subscription).
"""

import os

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

OVERRIDES = ("backend", "model_dir", "hf_model", "vit_model", "server_url", "server_model")


def node_with_overrides(context):
    params_file = LaunchConfiguration("params_file").perform(context)
    # launch_ros only warns, and the node would start on its defaults
    if not os.path.isfile(params_file):
        raise FileNotFoundError(f"params_file {params_file}: no such file")
    # Only arguments that were given override the parameter file; empty ones leave it alone.
    overrides = {name: LaunchConfiguration(name).perform(context) for name in OVERRIDES}
    return [
        Node(
            package="internvl_ros",
            executable="internvl_node",
            name="internvl",
            namespace=LaunchConfiguration("namespace"),
            parameters=[params_file, {k: v for k, v in overrides.items() if v}],
            remappings=[("image_raw", LaunchConfiguration("image_topic"))],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description():
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                description="YAML parameter file",
                default_value=PathJoinSubstitution(
                    [FindPackageShare("internvl_ros"), "config", "internvl.yaml"]
                ),
            ),
            DeclareLaunchArgument(
                "namespace", default_value="", description="namespace of the node and its topics"
            ),
            DeclareLaunchArgument(
                "backend",
                default_value="",
                description="auto | onnxruntime | axengine (default: from params_file)",
            ),
            DeclareLaunchArgument(
                "model_dir", default_value="", description="exported model directory"
            ),
            DeclareLaunchArgument(
                "hf_model", default_value="", description="original checkpoint (config + tokenizer)"
            ),
            DeclareLaunchArgument(
                "vit_model", default_value="", description="ViT model file (axmodel directories)"
            ),
            DeclareLaunchArgument(
                "server_url",
                default_value="",
                description="answer through this OpenAI-compatible server instead of model_dir",
            ),
            DeclareLaunchArgument(
                "server_model", default_value="", description="the server's model name"
            ),
            DeclareLaunchArgument(
                "image_topic", default_value="image_raw", description="camera topic for image_raw"
            ),
            OpaqueFunction(function=node_with_overrides),
        ]
    )
