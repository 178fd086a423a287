from setuptools import find_packages, setup

setup(
    name="ssl3d",
    version="0.1.0",
    description="Self-configuring self-supervised pretraining for 3D medical images, built on nnU-Net v2",
    python_requires=">=3.10",
    packages=find_packages(include=["ssl3d", "ssl3d.*"]),
    package_data={"ssl3d": ["nnunet_ext/*.py"]},
    install_requires=[
        "torch>=2.1",
        "nnunetv2>=2.5",
        "SimpleITK>=2.2",
        "batchgenerators>=0.25",
        "dynamic-network-architectures>=0.3",
        "monai>=1.4",
        "triton; platform_system=='Linux'",
        "scipy",
        "numpy",
        "tqdm",
        "blosc2",
    ],
    extras_require={"test": ["pytest", "pytest-xdist"]},
    entry_points={
        "console_scripts": [
            "ssl_make_demo_data=ssl3d.cli.make_demo_data:main",
            "ssl_plan_and_preprocess=ssl3d.cli.plan_and_preprocess:main",
            "ssl_pretrain=ssl3d.cli.pretrain:main",
            "ssl_finetune=ssl3d.cli.finetune:main",
            "ssl_finetune_cls=ssl3d.cli.finetune_cls:main",
            "ssl_predict=ssl3d.cli.predict:main",
            "ssl_benchmark=ssl3d.cli.benchmark:main",
            "ssl_extract_features=ssl3d.cli.extract_features:main",
            "ssl_export_weights=ssl3d.cli.finetune:export_main",
            "ssl_nnunet_ext_path=ssl3d.cli.finetune:ext_path_main",
        ]
    },
)
