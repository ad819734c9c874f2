from setuptools import setup

setup(
    name="tvm-rebirth",
    version="0.1.0",
    description="DeepRebirth layer slimming as Apache TVM Relax passes",
    python_requires=">=3.10",
    packages=["tvm_rebirth", "tvm_rebirth.passes", "tvm_rebirth.frontend", "tvm_rebirth.learn",
              "tvm_rebirth.planning", "tvm_rebirth.compile", "tvm_rebirth.deploy",
              "tvm_rebirth.report",
              # data only: the committed tuning_logs/ installed as tvm_rebirth/tuning_logs
              # (compile.database.packaged_tuning_logs); `tune` writes to the user cache
              "tvm_rebirth.tuning_logs"],
    package_data={"tvm_rebirth.frontend": ["zoo_data/*.onnx"],
                  "tvm_rebirth.deploy": ["qemu_plugin/*.c"],
                  "tvm_rebirth.tuning_logs": ["*/*/*.json"]},
    package_dir={"tvm_rebirth": "tvm_rebirth", "tvm_rebirth.passes": "passes",
                 "tvm_rebirth.tuning_logs": "tuning_logs"},
    install_requires=[
        "apache-tvm[rpc]==0.27.0.post1",
        # 0.1.15.x segfaults in tvm.ir.save_json (MetaSchedule databases).
        "apache-tvm-ffi==0.1.14.post1",
        "numpy>=1.24",
        "scipy>=1.10",
        "xgboost>=2.0",
        "pyyaml>=6.0",
        "onnx>=1.16",
        # materialises the zoo's BatchNorm statistics from real forward passes
        "onnxruntime>=1.17",
        "pillow>=9",  # calibration images (JPEG/PNG folders)
        "matplotlib>=3.7",  # the demo's report figures
    ],
    # peers: the x86 model converters for the peers on the emulated Cortex-A72 (ncnn via
    # pnnx, which needs torch; MNN's converter); the engines' aarch64 wheels are fetched
    # into the emulated device by the tool itself
    extras_require={"dev": ["pytest>=7", "pytest-xdist>=3.5"],
                    "peers": ["pnnx==20261020", "MNN==3.6.1"]},
    entry_points={"console_scripts": ["tvm-rebirth=tvm_rebirth.cli:main"]},
)
