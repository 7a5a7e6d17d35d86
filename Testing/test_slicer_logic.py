"""The Slicer module's Logic on a real, headless MRML scene (``slicer-core`` from PyPI; skipped without it).

Loads the bundled sample segmentation the way Slicer does (segmentation storage node), runs synthesis in the
background process with a tiny model, and checks geometry, provenance, subject hierarchy, cancel and errors.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_CT, SAMPLE_SEG

try:
    import slicer
    import vtk
except ImportError as exc:  # slicer-core is a test extra: `pip install -c constraints.txt slicer-core`
    pytest.skip(f"slicer-core is not installed or does not import ({exc}); install the [slicer] extra to run the "
                "Slicer logic tests", allow_module_level=True)

MODULE_DIR = Path(__file__).resolve().parent.parent / "CTSemanticSynth"
sys.path.insert(0, str(MODULE_DIR))

from CTSemanticSynthLib.labels import totalsegmentator_names  # noqa: E402
from CTSemanticSynthSlicerLib.logic import ATTRIBUTE_PREFIX, SynthesisError, SynthesisLogic  # noqa: E402
from CTSemanticSynthSlicerLib.process import State  # noqa: E402
from CTSemanticSynthSlicerLib.segments import LabelMappingError  # noqa: E402

FAST = {"steps": 2, "batchSize": 128, "device": "cpu"}


@pytest.fixture
def scene():
    """A fresh scene with the logics Slicer registers at startup (colours, segmentations, subject hierarchy)."""
    mrml = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(mrml)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(mrml)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(mrml)
    app.SetModuleLogic("Segmentations", segmentations)
    hierarchy = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    hierarchy.SetMRMLScene(mrml)
    app.SetModuleLogic("SubjectHierarchy", hierarchy)
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = mrml
    yield mrml
    slicer.mrmlScene = previous
    mrml.Clear(1)


@pytest.fixture
def logic(tmp_path):
    return SynthesisLogic(environment={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, tempRoot=str(tmp_path))


def matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def load_segmentation(scene, names: str = "file"):
    """The sample label map read as Slicer's Add Data does; ``names``: 'file' (Segment_N), 'totalseg' (names)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "case01 organs")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(SAMPLE_SEG))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if names == "totalseg":
        table = totalsegmentator_names(2)
        segmentation = node.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            segment.SetName(table[segment.GetLabelValue()])
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1")
    study = hierarchy.CreateStudyItem(patient, "Abdomen CT")
    hierarchy.CreateItem(study, node)
    return node


def load_volume(scene, path: Path, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def reference_matrix() -> tuple[np.ndarray, tuple]:
    """IJKToRAS and dimensions of the sample label map as Slicer reads it."""
    node = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(SAMPLE_SEG))
    assert storage.ReadData(node)
    return matrix(node), node.GetImageData().GetDimensions()


def test_synthesis_keeps_geometry_and_records_provenance(scene, logic, tiny_model, tmp_path):
    segmentation = load_segmentation(scene, names="totalseg")
    before = set(node_ids(scene))
    output = logic.synthesize(segmentation, timeout=240, model=str(tiny_model), seed=5, **FAST)

    expected, dims = reference_matrix()
    assert output.GetImageData().GetDimensions() == dims == (122, 101, 112)
    assert np.array_equal(matrix(output), expected)  # exactly the segmentation's grid
    assert output.GetName() == "case01 organs synthetic CT"
    array = slicer.util.arrayFromVolume(output)
    assert array.dtype == np.int16 and array.min() >= -1000 and array.max() <= 240

    config = json.loads((tiny_model / "config.json").read_text())
    attribute = lambda key: output.GetAttribute(ATTRIBUTE_PREFIX + key)  # noqa: E731
    assert attribute("Synthetic") == "true"
    assert attribute("ModelSha256") == config["sha256"]
    assert (attribute("Sampler"), attribute("Steps"), attribute("Seed")) == ("ddim", "2", "5")
    assert "SYNTHETIC" in attribute("Note") and "SYNTHETIC" in output.GetDescription()
    assert json.loads(attribute("Provenance"))["model_sha256"] == config["sha256"]
    assert attribute("SourceSegmentation") == "case01 organs"
    assert SynthesisLogic.isSynthetic(output)

    display = output.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel(), display.GetAutoWindowLevel()) == (400, 40, 0)

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation))
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(output)) == study
    assert hierarchy.GetItemName(study) == "Abdomen CT"

    added = set(node_ids(scene)) - before
    assert {scene.GetNodeByID(i).GetClassName() for i in added} == {"vtkMRMLScalarVolumeNode", "vtkMRMLScalarVolumeDisplayNode"}
    assert list(tmp_path.iterdir()) == []  # the temporary folder was removed


def test_cancel_leaves_the_scene_unchanged(scene, logic, tiny_model, tmp_path):
    segmentation = load_segmentation(scene)
    reference = load_volume(scene, SAMPLE_CT, "case01 CT")
    existing = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "previous result")
    ids, mtime = node_ids(scene), existing.GetMTime()
    task = logic.startSynthesis(segmentation, outputVolumeNode=existing, referenceVolumeNode=reference,
                                model=str(tiny_model), labels="totalseg", **{**FAST, "steps": 50, "batchSize": 8})
    assert node_ids(scene) == ids  # starting exports to files only
    deadline = time.monotonic() + 120
    while task.poll() is State.RUNNING and task.process.total == 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # wait until sampling has begun, so the cancel hits a busy process
    assert task.poll() is State.RUNNING, task.process.lines
    pid = task.process._proc.pid
    task.cancel()
    assert task.poll() is State.CANCELLED
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert node_ids(scene) == ids and existing.GetMTime() == mtime and existing.GetImageData() is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SynthesisError, match="cancelled"):
        logic.finishSynthesis(task)


def test_unknown_segment_names_get_a_clear_error(scene, logic):
    segmentation = load_segmentation(scene)  # names 'Segment_1', ... as Slicer names an unnamed label map
    ids = node_ids(scene)
    with pytest.raises(LabelMappingError, match=r"no segment is an organ.*'Segment_1'.*JSON mapping"):
        logic.startSynthesis(segmentation)
    classes = logic.classifySegments(segmentation, labels="totalseg")  # the same segments by label value
    assert "liver" in classes.organNames and not classes.unknown

    segments = segmentation.GetSegmentation()
    segments.GetNthSegment(0).SetName("spleen")
    segments.GetNthSegment(1).SetName("Tumor")
    with pytest.raises(LabelMappingError, match="'Tumor'"):
        logic.startSynthesis(segmentation, strictLabels=True)
    classes = logic.classifySegments(segmentation)  # not strict: reported and treated as body tissue
    assert "Tumor" in classes.warning() and classes.organNames == ["spleen"]
    assert node_ids(scene) == ids


def test_export_follows_the_reference_geometry(scene, logic, tmp_path):
    segmentation = load_segmentation(scene)
    ct = load_volume(scene, SAMPLE_CT, "case01 CT")
    ids = node_ids(scene)
    liver = [s.segmentId for s in logic.segments(segmentation) if s.labelValue == 5]
    ijkToRAS, dims = logic.exportLabelmap(segmentation, liver, ct, tmp_path / "liver.nrrd")
    assert np.array_equal(ijkToRAS, matrix(ct)) and dims == ct.GetImageData().GetDimensions()
    assert node_ids(scene) == ids  # the temporary label map, colour table and display node are gone

    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    empty.GetSegmentation().AddEmptySegment("liver", "liver")
    with pytest.raises(ValueError, match="no reference geometry.*reference CT"):
        logic.startSynthesis(empty)


def test_review_layout_and_dice_table(scene, logic, tmp_path):
    segmentation = load_segmentation(scene)
    real = load_volume(scene, SAMPLE_CT, "real")
    synthetic = load_volume(scene, SAMPLE_CT, "synthetic")
    layout = scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    views = {}
    for name in ("Red", "Yellow"):
        views[name] = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        views[name].SetLayoutName(name)

    shown = logic.setupReviewLayout(synthetic, segmentation, real)
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    assert shown == {"Red": real.GetID(), "Yellow": synthetic.GetID()}
    assert views["Red"].GetBackgroundVolumeID() == real.GetID() and views["Red"].GetLinkedControl()
    display = segmentation.GetDisplayNode()
    assert display.GetVisibility2DOutline() and not display.GetVisibility2DFill() and display.GetNumberOfViewNodeIDs() == 0
    assert real.GetDisplayNode().GetWindow() == synthetic.GetDisplayNode().GetWindow() == 400
    assert logic.setupReviewLayout(synthetic, segmentation, real, swap=True)["Red"] == synthetic.GetID()
    assert views["Yellow"].GetBackgroundVolumeID() == real.GetID()

    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "dice")
    logic.fillDiceTable(table, {"synthetic": {"dice": {"liver": 0.9, "spleen": 0.7}, "mean": 0.8},
                                "real": {"dice": {"liver": 0.95, "spleen": 0.85}}})
    assert table.GetNumberOfColumns() == 3 and table.GetNumberOfRows() == 3
    assert [table.GetCellText(r, 0) for r in range(3)] == ["Spleen", "Liver", "Mean"]
    assert float(table.GetCellText(2, 1)) == pytest.approx(0.8) and float(table.GetCellText(1, 2)) == pytest.approx(0.95)
