"""The Slicer module's Logic on a real, headless MRML scene (``slicer-core`` from PyPI; skipped without it).

Loads the bundled sample segmentation the way Slicer does (segmentation storage node), runs synthesis in the
background process with a tiny model, and checks geometry, provenance, subject hierarchy, cancel and errors.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
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
from data_builders.slicer_scene import headless_scene, load_sample_segmentation  # noqa: E402
from CTSemanticSynthSlicerLib.logic import SynthesisError, SynthesisLogic, TotalSegmentatorWeightsMissing  # noqa: E402
from CTSemanticSynthSlicerLib.tasks import ATTRIBUTE_PREFIX  # noqa: E402
from CTSemanticSynthSlicerLib.nodes import segmentationFromArray  # noqa: E402
from CTSemanticSynthSlicerLib.process import State  # noqa: E402
from CTSemanticSynthSlicerLib.segments import LabelMappingError  # noqa: E402

FAST = {"steps": 2, "batchSize": 128, "device": "cpu"}


def cli_options(command: str) -> set[str]:
    """The options ``ctsynth COMMAND --help`` documents (the real command line, run as the module runs it)."""
    result = subprocess.run([sys.executable, "-m", "CTSemanticSynthLib.cli", command, "--help"], capture_output=True,
                            text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))


@pytest.fixture
def scene():
    """A fresh scene with the logics Slicer registers at startup (colours, segmentations, subject hierarchy)."""
    previous = getattr(slicer, "mrmlScene", None)
    mrml, app = headless_scene()
    yield mrml
    slicer.mrmlScene = previous
    mrml.Clear(1)
    del app


@pytest.fixture
def logic(tmp_path):
    return SynthesisLogic(environment={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, tempRoot=str(tmp_path))


def matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def nrrd_encoding(path) -> str:
    """The ``encoding`` field of a NRRD header ('raw' when uncompressed)."""
    with open(path, "rb") as f:
        header = f.read(4096).split(b"\n\n")[0].decode("ascii", "replace")
    return next(line.split(":", 1)[1].strip() for line in header.splitlines() if line.startswith("encoding:"))


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


EXTENSION_NAMES = {"lung_upper_lobe_left": "superior lobe of left lung", "lung_lower_lobe_left": "inferior lobe of left lung",
                   "lung_lower_lobe_right": "inferior lobe of right lung", "autochthon_left": "left deep back muscle",
                   "autochthon_right": "right deep back muscle", "iliopsoas_left": "left iliopsoas muscle",
                   "iliopsoas_right": "right iliopsoas muscle", "iliac_artery_left": "left common iliac artery",
                   "iliac_artery_right": "right common iliac artery", "iliac_vena_left": "left common iliac vein",
                   "iliac_vena_right": "right common iliac vein", "costal_cartilages": "costal cartilage",
                   "small_bowel": "small intestine", "urinary_bladder": "urinary bladder"}


def extension_name(name: str) -> str:
    """A TotalSegmentator v2 structure's segment name as the Slicer TotalSegmentator extension writes it ('superior
    lobe of left lung', 'L3 vertebra', 'left rib 3', 'left deep back muscle', 'left kidney', 'portal vein and
    splenic vein')."""
    rib = re.fullmatch(r"rib_(left|right)_(\d+)", name)
    side = re.fullmatch(r"(.+)_(left|right)", name)
    if name in EXTENSION_NAMES:
        return EXTENSION_NAMES[name]
    if name.startswith("vertebrae_"):
        return f"{name[len('vertebrae_'):]} vertebra"
    if rib:
        return f"{rib[1]} rib {rib[2]}"
    return f"{side[2]} {side[1].replace('_', ' ')}" if side else name.replace("_", " ")


def load_segmentation(scene, names: str = "file"):
    """The sample label map read as Slicer's Add Data does; ``names``: 'file' (Segment_N), 'totalseg'
    (TotalSegmentator's names), 'extension' (the names the Slicer TotalSegmentator extension gives its segments)."""
    node = load_sample_segmentation(scene)
    if names in ("totalseg", "extension"):
        table = totalsegmentator_names(2)
        segmentation = node.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            name = table[segment.GetLabelValue()]
            segment.SetName(extension_name(name) if names == "extension" else name)
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
    assert {scene.GetNodeByID(i).GetClassName() for i in added} == {"vtkMRMLScalarVolumeNode", "vtkMRMLScalarVolumeDisplayNode",
                                                                     "vtkMRMLLabelMapVolumeNode"}
    assert all(scene.GetNodeByID(i).GetHideFromEditors() for i in added if "LabelMap" in i)  # the segmentation state
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
    assert task.wait(30) is State.CANCELLED and task.process.returncode == 130  # it stopped itself, cleanly
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
    assert logic.bodyTissueText(segmentation).startswith("no segment is an organ")  # the panel says why at once
    assert logic.bodyTissueText(segmentation, "totalseg").startswith("Synthesized as body tissue: known structures 'Segment_")
    assert logic.bodyTissueText(None) == ""

    segments = segmentation.GetSegmentation()
    segments.GetNthSegment(0).SetName("spleen")
    segments.GetNthSegment(1).SetName("Tumor")
    with pytest.raises(LabelMappingError, match="'Tumor'"):
        logic.startSynthesis(segmentation, strictLabels=True)
    classes = logic.classifySegments(segmentation)  # not strict: reported and treated as body tissue
    assert "Tumor" in classes.warning() and classes.organNames == ["spleen"]
    assert "unrecognised 'Tumor'" in logic.bodyTissueText(segmentation)  # listed in the panel before Apply
    assert node_ids(scene) == ids


def test_export_follows_the_reference_geometry(scene, logic, tmp_path):
    segmentation = load_segmentation(scene)
    ct = load_volume(scene, SAMPLE_CT, "case01 CT")
    ids = node_ids(scene)
    liver = [s.segmentId for s in logic.segments(segmentation) if s.labelValue == 5]
    ijkToRAS, dims = logic.exportLabelmap(segmentation, liver, ct, tmp_path / "liver.nrrd")
    assert np.array_equal(ijkToRAS, matrix(ct)) and dims == ct.GetImageData().GetDimensions()
    assert node_ids(scene) == ids  # the temporary label map, colour table and display node are gone

    with pytest.raises(ValueError, match="cannot receive the synthetic CT"):
        logic.startSynthesis(segmentation, outputVolumeNode=ct, referenceVolumeNode=ct, labels="totalseg")

    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    empty.GetSegmentation().AddEmptySegment("liver", "liver")
    with pytest.raises(ValueError, match="no reference geometry.*reference CT"):
        logic.startSynthesis(empty)


def slice_views(scene) -> dict[str, tuple]:
    """Slice and composite nodes as Slicer's layout creates them (Red axial, Yellow sagittal, Green coronal)."""
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    views = {}
    for name in ("Red", "Yellow", "Green"):
        slice_node = next(scene.GetNthNodeByClass(i, "vtkMRMLSliceNode") for i in
                          range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))
                          if scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetLayoutName() == name)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        views[name] = (slice_node, composite)
    return views, layout_logic


def test_review_views_share_orientation_and_link(scene, logic):
    segmentation = load_segmentation(scene)
    real = load_volume(scene, SAMPLE_CT, "real")
    synthetic = load_volume(scene, SAMPLE_CT, "synthetic")
    views, layout_logic = slice_views(scene)
    assert views["Yellow"][0].GetOrientation() == "Sagittal"  # Slicer's default: the bug this guards against

    shown = logic.showReview(synthetic, segmentation, real)
    assert layout_logic.GetLayoutNode().GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    assert shown == {"Red": real.GetID(), "Yellow": synthetic.GetID()}
    for name in ("Red", "Yellow"):
        slice_node, composite = views[name]
        assert slice_node.GetOrientation() == "Axial" and composite.GetLinkedControl()
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(views["Red"][0].GetSliceToRAS())[:3, :3],
                               slicer.util.arrayFromVTKMatrix(views["Yellow"][0].GetSliceToRAS())[:3, :3])
    assert views["Red"][1].GetBackgroundVolumeID() == real.GetID()
    assert views["Yellow"][1].GetBackgroundVolumeID() == synthetic.GetID()
    display = segmentation.GetDisplayNode()
    assert display.GetVisibility2DOutline() and not display.GetVisibility2DFill() and display.GetNumberOfViewNodeIDs() == 0
    assert real.GetDisplayNode().GetWindow() == synthetic.GetDisplayNode().GetWindow() == 400
    assert real.GetDisplayNode().GetLevel() == synthetic.GetDisplayNode().GetLevel() == 40

    logic.showReview(synthetic, segmentation, real, swap=True, orientation="Coronal")
    assert [views[n][0].GetOrientation() for n in ("Red", "Yellow")] == ["Coronal", "Coronal"]
    assert views["Red"][1].GetBackgroundVolumeID() == synthetic.GetID()
    assert views["Yellow"][1].GetBackgroundVolumeID() == real.GetID()
    with pytest.raises(ValueError, match="unknown orientation 'Oblique'"):
        logic.showReview(synthetic, segmentation, real, orientation="Oblique")


def test_blinding_hides_names_and_data_entries_and_reveal_restores_them(scene, logic):
    segmentation = load_segmentation(scene)
    real = load_volume(scene, SAMPLE_CT, "case01 CT")
    synthetic = load_volume(scene, SAMPLE_CT, "case01 synthetic CT")
    slice_views(scene)
    with pytest.raises(ValueError, match="needs the real CT"):
        logic.showReview(synthetic, segmentation, None, blind=True)
    assert not logic.blinding.active and synthetic.GetName() == "case01 synthetic CT"

    logic.showReview(synthetic, segmentation, real, swap=True, blind=True)
    assert (synthetic.GetName(), real.GetName()) == ("Left volume", "Right volume")  # nothing tells them apart
    assert synthetic.GetHideFromEditors() and real.GetHideFromEditors()  # not in the Data module / selectors
    assert logic.blinding.active
    logic.showReview(synthetic, segmentation, real, blind=True)  # a second review keeps the real names
    assert (real.GetName(), synthetic.GetName()) == ("Left volume", "Right volume")
    logic.reveal()
    assert (real.GetName(), synthetic.GetName()) == ("case01 CT", "case01 synthetic CT")
    assert not real.GetHideFromEditors() and not synthetic.GetHideFromEditors() and not logic.blinding.active
    logic.showReview(synthetic, segmentation, real, blind=True)
    logic.showReview(synthetic, segmentation, real, blind=False)  # an unblinded review ends blinding too
    assert synthetic.GetName() == "case01 synthetic CT" and not synthetic.GetHideFromEditors()


def test_blinding_keeps_the_panels_selections_and_restores_every_property(scene, logic):
    """Slicer's node selectors drop hidden nodes and write that into the parameter node: Reveal puts the panel's
    selections back, and every display property blinding or the review layout changed."""
    segmentation = load_segmentation(scene)
    real = load_volume(scene, SAMPLE_CT, "case01 CT")
    synthetic = load_volume(scene, SAMPLE_CT, "case01 synthetic CT")
    other = load_volume(scene, SAMPLE_CT, "another CT")
    slice_views(scene)
    for node, (window, level, colors) in ((real, (1500, 300, "vtkMRMLColorTableNodeRainbow")),
                                          (synthetic, (350, 50, "vtkMRMLColorTableNodeGrey"))):
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().AutoWindowLevelOff()
        node.GetDisplayNode().SetWindowLevel(window, level)
        node.GetDisplayNode().SetAndObserveColorNodeID(colors)
    real.SetHideFromEditors(False)
    panel = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "CTSemanticSynth")
    for role, node in (("inputSegmentation", segmentation), ("referenceVolume", real), ("outputVolume", synthetic)):
        panel.SetNodeReferenceID(role, node.GetID())
    state = lambda n: (n.GetName(), n.GetHideFromEditors(), n.GetDisplayNode().GetWindow(),  # noqa: E731
                       n.GetDisplayNode().GetLevel(), n.GetDisplayNode().GetAutoWindowLevel(),
                       n.GetDisplayNode().GetColorNodeID())
    before = {n.GetID(): state(n) for n in (real, synthetic)}

    logic.showReview(synthetic, segmentation, real, blind=True, parameterNode=panel)
    displays = [n.GetDisplayNode() for n in (real, synthetic)]
    assert len({(d.GetWindow(), d.GetLevel(), d.GetColorNodeID()) for d in displays}) == 1  # shown alike
    displays[1].SetWindowLevel(2000, 400)  # a drag to a bone window would show the synthetic CT's clipping ...
    displays[0].AutoWindowLevelOn()
    assert [(d.GetWindow(), d.GetLevel(), d.GetAutoWindowLevel()) for d in displays] == [(400, 40, 0)] * 2  # ... held
    panel.SetNodeReferenceID("outputVolume", None)  # what the selectors do with the hidden volumes
    panel.SetNodeReferenceID("referenceVolume", other.GetID())
    logic.reveal()
    assert {n.GetID(): state(n) for n in (real, synthetic)} == before
    assert panel.GetNodeReference("outputVolume") is synthetic and panel.GetNodeReference("referenceVolume") is real
    assert panel.GetNodeReference("inputSegmentation") is segmentation


def test_cases_from_the_scene_skip_undo_copies_and_repeat_a_real_ct_only_when_asked(scene, logic):
    from CTSemanticSynthSlicerLib.regeneration import UNDO_ROLE

    reals = [scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"real {i}") for i in range(2)]

    def synthetic(name, real):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.SetAttribute(ATTRIBUTE_PREFIX + "Synthetic", "true")
        node.SetAttribute(ATTRIBUTE_PREFIX + "ReferenceVolumeID", real.GetID())
        return node

    first = synthetic("a", reals[0])
    samples = [synthetic(f"a sample {k}", reals[0]) for k in (2, 3)]
    undo = synthetic("a before regeneration", reals[0])
    first.SetNodeReferenceID(UNDO_ROLE, undo.GetID())
    second = synthetic("b", reals[1])
    assert [c.synthetic for c in logic.casesFromScene(scene)] == [first.GetID(), second.GetID()]
    assert [c.synthetic for c in logic.casesFromScene(scene, samplesPerCase=5)] == [
        first.GetID(), samples[0].GetID(), samples[1].GetID(), second.GetID()]  # never the undo copy


def test_dice_table(scene):
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "dice")
    SynthesisLogic.fillDiceTable(table, {"totalseg": {"synthetic": {"liver": 0.9, "spleen": 0.7, "pancreas": None},
                                                      "real": {"liver": 0.95, "spleen": 0.85}, "mean_synthetic": 0.8}})
    assert table.GetNumberOfColumns() == 3 and table.GetNumberOfRows() == 3
    assert [table.GetCellText(r, 0) for r in range(3)] == ["Spleen", "Liver", "Mean"]
    assert float(table.GetCellText(2, 1)) == pytest.approx(0.8) and float(table.GetCellText(1, 2)) == pytest.approx(0.95)
    assert table.GetColumnName(2) == "Dice real CT (unclipped)"  # an older report: the table does not pretend
    intensity = "both CTs as synthesis writes them: the body clipped to -160..240 HU (L40/W400), air outside"
    SynthesisLogic.fillDiceTable(table, {"totalseg": {"synthetic": {"liver": 0.9}, "real": {"liver": 0.95},
                                                      "intensity": intensity}})
    assert table.GetColumnName(2) == "Dice real CT (clipped like the synthetic)"
    assert table.GetColumnDescription("Dice real CT (clipped like the synthetic)") == intensity


def test_dice_table_lists_every_class_of_the_synthetics_set(scene):
    """A report made in the anatomy set (its synthetic CT's provenance says so): every class with a Dice, the organs
    first, then the others in the set's order, with the set's display names; the mean is the report's."""
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "dice")
    dice = {"vertebrae": 0.6, "lung": 0.8, "liver": 0.9, "autochthon": None, "spleen": 0.7}
    SynthesisLogic.fillDiceTable(table, {"synthetic_provenance": anatomy_provenance(),
                                         "totalseg": {"synthetic": dice, "mean_synthetic": 0.75}})
    rows = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
    assert rows == ["Spleen", "Liver", "Lungs and airways", "Vertebrae", "Mean"] and table.GetColumnName(0) == "Class"
    assert [float(table.GetCellText(r, 1)) for r in range(5)] == pytest.approx([0.7, 0.9, 0.8, 0.6, 0.75])


def test_empty_segmentation_and_other_grid_are_refused_and_the_scene_is_unchanged(scene, logic, tmp_path):
    segmentation = load_segmentation(scene, names="totalseg")
    ct = load_volume(scene, SAMPLE_CT, "case01 CT")
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other CT")
    slicer.util.updateVolumeFromArray(other, np.zeros((40, 50, 60), dtype=np.int16))
    other.SetSpacing(1.0, 1.0, 2.0)
    ids = node_ids(scene)
    with pytest.raises(ValueError, match="'case01 organs' is on another grid than reference CT 'other CT'"):
        logic.startSynthesis(segmentation, referenceVolumeNode=other)
    ct_shifted = load_volume(scene, SAMPLE_CT, "shifted CT")
    origin = ct_shifted.GetOrigin()
    ct_shifted.SetOrigin(origin[0] + 1.5, origin[1], origin[2])  # same size and spacing, half a voxel off
    with pytest.raises(ValueError, match="another grid than reference CT 'shifted CT'"):
        logic.startSynthesis(segmentation, referenceVolumeNode=ct_shifted)
    scene.RemoveNode(ct_shifted)
    assert node_ids(scene) == ids and list(tmp_path.iterdir()) == []

    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    empty.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    empty.GetSegmentation().AddEmptySegment("liver", "liver")
    empty.GetSegmentation().AddEmptySegment("spleen", "spleen")
    ids = node_ids(scene)
    with pytest.raises(ValueError, match="segmentation 'drawn' is empty"):
        logic.startSynthesis(empty, referenceVolumeNode=ct)
    assert node_ids(scene) == ids and list(tmp_path.iterdir()) == []  # no node, no temporary folder left
    bare = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "bare")
    bare.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    with pytest.raises(LabelMappingError, match="no segments"):
        logic.startSynthesis(bare)


def test_model_card_comes_from_the_library(scene, logic, tiny_model):
    """`ctsynth info --json` finds and checks the model in the background process; its errors are passed on."""
    task = logic.startModelInfo(str(tiny_model))
    task.wait(120)
    config = logic.finishModelInfo(task)
    assert config["sha256"] == json.loads((tiny_model / "config.json").read_text())["sha256"]
    assert logic.modelSummary(config).splitlines()[:3] == [
        "tiny-concat (concat, 32x32)", "class set: paper (17 classes)",
        "intensity: paper_window (-160 HU -> 0, 240 HU -> 1; clipped outside -160..240 HU)"]
    assert logic.modelConfigs[str(tiny_model)] == config  # kept: Apply maps the segments with its class set
    assert logic.modelClassSet(str(tiny_model)) == logic.knownClassSet(str(tiny_model)) == "paper"
    assert logic.knownClassSet("not read yet") == "paper"
    task = logic.startModelInfo("no-such-model")
    task.wait(120)
    with pytest.raises(SynthesisError, match="model 'no-such-model' not found"):
        logic.finishModelInfo(task)


def test_a_model_trained_on_one_patient_says_so_when_selected(tiny_model):
    demo = json.loads((Path(__file__).resolve().parent.parent / "Resources" / "models" / "demo" / "config.json").read_text())
    assert "Warning: trained on one patient" in SynthesisLogic.modelSummary(demo)  # its card: "trained on ONE patient"
    assert "Warning" not in SynthesisLogic.modelSummary(json.loads((tiny_model / "config.json").read_text()))
    many = {**demo, "training": {**demo["training"], "patients": 240}}  # a stated count wins over the prose
    assert "Warning" not in SynthesisLogic.modelSummary(many)
    assert "Warning" in SynthesisLogic.modelSummary({**many, "training": {"patients": 1}, "description": ""})


def test_reader_study_case_from_files_is_shown_blinded_and_removed(scene, logic, tmp_path):
    from CTSemanticSynthSlicerLib.reader_study import ReaderStudy, casesFromFolder

    case_dir = tmp_path / "study" / "case01"
    case_dir.mkdir(parents=True)
    shutil.copy(SAMPLE_CT, case_dir / "real.nii.gz")
    shutil.copy(SAMPLE_CT, case_dir / "synthetic.nii.gz")
    shutil.copy(SAMPLE_SEG, case_dir / "seg.nii.gz")
    views, _ = slice_views(scene)
    ids = node_ids(scene)
    study = ReaderStudy(tmp_path / "answers.csv", casesFromFolder(tmp_path / "study"), "R1", seed=0)
    _, case, side = study.current()
    added = logic.showStudyCase(case, side, "Sagittal")
    shown = {"left": views["Red"][1].GetBackgroundVolumeID(), "right": views["Yellow"][1].GetBackgroundVolumeID()}
    assert shown[side] == added[1].GetID()  # the synthetic CT is on the planned side
    assert {scene.GetNodeByID(i).GetName() for i in shown.values()} == {"Left volume", "Right volume"}
    assert all(scene.GetNodeByID(i).GetHideFromEditors() for i in shown.values())
    assert [views[n][0].GetOrientation() for n in ("Red", "Yellow")] == ["Sagittal", "Sagittal"]
    assert added[2].IsA("vtkMRMLSegmentationNode") and added[2].GetSegmentation().GetNumberOfSegments() > 0
    np.testing.assert_allclose(matrix(added[0]), reference_matrix()[0], atol=1e-9)  # the file's geometry
    study.markShown(case.caseId)
    logic.endStudyCase(added)
    assert node_ids(scene) == ids  # the case's volumes, segmentation and their display nodes are gone
    assert not logic.blinding.active
    study.answer(side, 2, 4)
    table = logic.studyTable(study.summary())
    assert (table.GetCellText(0, 0), table.GetCellText(0, 1)) == ("cases answered", "1")
    assert logic.studyTable(study.summary()) is table and table.GetCellText(2, 1) == "1.000"  # updated in place


def test_reader_study_cases_from_the_scene(scene, logic, tiny_model):
    segmentation = load_segmentation(scene)
    with pytest.raises(ValueError, match="no synthetic CT made with a reference CT"):
        logic.casesFromScene(scene)
    real = load_volume(scene, SAMPLE_CT, "case01 CT")
    synthetic = logic.synthesize(segmentation, timeout=240, model=str(tiny_model), referenceVolumeNode=real,
                                 labels="totalseg", **FAST)
    cases = logic.casesFromScene(scene)
    assert [(c.real, c.synthetic, c.segmentation) for c in cases] == [(real.GetID(), synthetic.GetID(),
                                                                       segmentation.GetID())]
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    added = logic.showStudyCase(cases[0], "left")
    assert added == [] and synthetic.GetName() in ("Left volume", "Right volume")
    logic.endStudyCase(added)  # the scene's own nodes stay, with their names
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes
    assert (synthetic.GetName(), real.GetName()) == ("case01 organs synthetic CT", "case01 CT")


def test_command_mapping_and_body_outline(scene, tmp_path):
    """What the background process is given: the segments as values 1..N, a JSON mapping, the body outline."""
    true = shutil.which("true")
    if true is None:
        pytest.skip("needs a 'true' executable to stand in for PythonSlicer")
    logic = SynthesisLogic(pythonExecutable=true, tempRoot=str(tmp_path), keepFiles=True)
    segmentation = load_segmentation(scene, names="totalseg")
    segments = segmentation.GetSegmentation()
    segments.GetSegment(segments.GetSegmentIdBySegmentName("liver")).SetName("Liver")
    segments.GetSegment(segments.GetSegmentIdBySegmentName("urinary_bladder")).SetName("body")
    segments.GetSegment(segments.GetSegmentIdBySegmentName("spleen")).SetName("Milz")
    task = logic.startSynthesis(segmentation, model="demo", preset="balanced", seed=9, steps=0, classSet="paper")
    task.wait(30)
    args = task.process.args
    assert args[1:4] == ["-m", "CTSemanticSynthLib.cli", "synth"]
    option = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert (option("--preset"), option("--seed"), option("--model")) == ("balanced", "9", "demo")
    assert "--steps" not in args and Path(option("--body-mask")).is_file()
    assert "--sampler" not in args and option("--precision") == "auto"  # the preset's sampler, the CLI's default
    assert option("--batch-size") == "auto"  # the panel's default 0 shows as "auto"
    assert "--progress-lines" in args and set(a for a in args if a.startswith("--")) <= cli_options("synth")
    mapping = json.loads(Path(option("--labels")).read_text())
    assert mapping["1"] == "body" and "liver" in mapping.values() and "spleen" not in mapping.values()
    assert sorted(mapping, key=int) == [str(i) for i in range(1, len(mapping) + 1)]
    assert "'Milz'" in task.warnings[0]
    assert nrrd_encoding(option("--seg")) == nrrd_encoding(option("--body-mask")) == "raw"  # fast on the GUI thread
    labels = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(option("--seg"))
    assert storage.ReadData(labels)
    values = slicer.util.arrayFromVolume(labels)
    liver_value = int([k for k, v in mapping.items() if v == "liver"][0])
    reference = slicer.util.arrayFromVolume(load_volume(scene, SAMPLE_SEG, "raw"))
    assert np.array_equal(values == liver_value, reference == 5)  # the liver voxels, on the same grid
    with pytest.raises(SynthesisError):
        logic.finishSynthesis(task)  # the stand-in wrote nothing


@pytest.mark.parametrize("sampler,precision", [("dpmsolver++", "bf16"), ("ancestral", "fp32")])
def test_sampler_and_precision_reach_the_command(scene, tmp_path, sampler, precision):
    """The panel's Sampler and Precision combo boxes become ctsynth's --sampler and --precision."""
    true = shutil.which("true")
    if true is None:
        pytest.skip("needs a 'true' executable to stand in for PythonSlicer")
    logic = SynthesisLogic(pythonExecutable=true, tempRoot=str(tmp_path))
    task = logic.startSynthesis(load_segmentation(scene, names="totalseg"), sampler=sampler, precision=precision,
                                steps=4, batchSize=3, classSet="paper")
    task.wait(30)
    args = task.process.args
    option = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert (option("--sampler"), option("--precision"), option("--steps")) == (sampler, precision, "4")
    assert option("--batch-size") == "3"
    assert {"--sampler", "--precision"} <= cli_options("synth")
    task.cleanup()


@pytest.mark.parametrize("class_set", ["paper", "anatomy"])
def test_finish_dice_loads_table_and_segmentation(scene, logic, tmp_path, class_set):
    """finishDice with the files `ctsynth evaluate` is expected to write (see SynthesisLogic.diceCommand); the
    TotalSegmentator segmentation is named in the report's class set (class 21: vertebrae in the anatomy set)."""
    from CTSemanticSynthLib.io import Volume, read_labelmap, write_volume
    from CTSemanticSynthSlicerLib.tasks import BackgroundTask
    from CTSemanticSynthSlicerLib.process import BackgroundProcess

    synthetic = load_volume(scene, SAMPLE_CT, "case01 synthetic CT")
    work = tmp_path / "dice"
    work.mkdir()
    seg, _ = read_labelmap(SAMPLE_SEG)
    second = 1 if class_set == "paper" else 21  # the spleen's voxels: spleen, or vertebrae in the anatomy set
    amos = np.where(seg.array == 5, 6, np.where(seg.array == 1, second, 0)).astype(np.uint8)
    write_volume(Volume(amos, seg.affine), work / "totalseg_synthetic.nii.gz")
    report = {"totalseg": {"synthetic": {"liver": 0.91, "spleen": 0.8}}}
    if class_set == "anatomy":
        report = {"synthetic_provenance": anatomy_provenance(), "totalseg": {"synthetic": {"liver": 0.91,
                                                                                           "vertebrae": 0.8}}}
    (work / "dice.json").write_text(json.dumps(report))
    process = BackgroundProcess([sys.executable, "-c", "print('PROGRESS 1/1')"]).start()
    task = BackgroundTask(process, work, "dice", inputs={"syntheticID": synthetic.GetID(), "json": work / "dice.json",
                                                          "totalseg": work / "totalseg_synthetic.nii.gz"})
    task.wait(30)
    table, segmentation = logic.finishDice(task)
    assert table.GetName() == "case01 synthetic CT Dice" and table.GetNumberOfRows() == 3
    names = sorted(segmentation.GetSegmentation().GetNthSegment(i).GetName()
                   for i in range(segmentation.GetSegmentation().GetNumberOfSegments()))
    assert names == (["Liver", "Spleen"] if class_set == "paper" else ["Liver", "Vertebrae"]) and not work.exists()
    assert {scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes())} >= {"vtkMRMLTableNode"}
    assert not scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems()


def test_dice_command_matches_ctsynth_evaluate(tmp_path):
    args = SynthesisLogic.diceCommand(tmp_path / "s.nii.gz", tmp_path / "l.nrrd", tmp_path / "l.json",
                                      tmp_path / "r.nii.gz", tmp_path / "d.json", tmp_path / "t.nii.gz", "cpu", False)
    options = {a for a in map(str, args) if a.startswith("--")}
    assert args[0] == "evaluate" and {"--totalseg", "--real", "--full", "--json"} <= options
    assert "--save-totalseg" in options and options <= cli_options("evaluate")  # all exist in the real command


def test_slicer_process_never_imports_torch():
    """Everything the module runs in Slicer's own process (logic, segments, review, reader study) is torch-free."""
    code = (f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r})\n"
            "import CTSemanticSynthSlicerLib.logic, CTSemanticSynthSlicerLib.dependencies\n"
            "import CTSemanticSynthSlicerLib.reader_study, CTSemanticSynthSlicerLib.review\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_left_handed_oblique_grid_is_kept_voxel_for_voxel(scene, logic, tiny_model):
    """A left-handed, oblique grid (the case NIfTI readers get wrong) comes back unchanged, organs in place."""
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    ijkToRAS = np.eye(4)
    ijkToRAS[:3, :3] = rotation @ np.diag([4.0, 4.0, -5.0])  # det < 0: left-handed
    ijkToRAS[:3, 3] = [-90.0, 40.0, 120.0]
    labels = np.zeros((10, 64, 64), dtype=np.int16)  # K, J, I
    labels[2:8, 4:20, 4:22] = 1  # "liver" in one corner: a flipped read would put it in the background
    labels[3:7, 6:14, 26:32] = 2
    labelmap = slicer.util.addVolumeFromArray(labels, ijkToRAS, "labels", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "oblique")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segmentation.GetSegmentation().GetNthSegment(0).SetName("Liver")
    segmentation.GetSegmentation().GetNthSegment(1).SetName("Spleen")

    output = logic.synthesize(segmentation, timeout=240, model=str(tiny_model), **FAST)
    np.testing.assert_array_equal(matrix(output), matrix(labelmap))
    hu = slicer.util.arrayFromVolume(output)
    assert hu.shape == labels.shape
    assert (hu[labels > 0] > -1000).all()  # organs are tissue where they were drawn ...
    assert (hu[:, 50:, 50:] == -1000).all()  # ... and the far corner, outside the body, is air


def dice_case(scene, names=("liver", "spleen")):
    """A 36 x 32 x 24 CT at 3 mm with a liver and a second structure (``names``) segmented (TotalSegmentator's fast
    grid); the second is bone-bright (1200 HU)."""
    ct = np.full((24, 32, 36), -1000, dtype=np.int16)  # K, J, I
    ct[4:20, 6:26, 6:30] = 40
    labels = np.zeros(ct.shape, dtype=np.int16)
    labels[6:18, 8:20, 8:28] = 1
    labels[8:14, 21:25, 10:16] = 2
    ct[labels == 2] = 1200
    ijk_to_ras = np.diag([-3.0, -3.0, 3.0, 1.0])
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case synthetic CT")
    slicer.util.updateVolumeFromArray(volume, ct)
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    segmentation = segmentationFromArray(labels, ijk_to_ras, "organs", names)
    return volume, segmentation, labels


def anatomy_provenance() -> dict:
    """What synthesis stores on a synthetic CT of a full-range anatomy-set model (the parts evaluate reads)."""
    from CTSemanticSynthLib.intensity import FULL_RANGE
    from CTSemanticSynthLib.labels import class_set

    return {"synthetic": True, "model": "tiny-anatomy", "class_set": "anatomy",
            "classes": list(class_set("anatomy").classes), "intensity": FULL_RANGE.config()}


def test_dice_of_an_anatomy_synthetic_is_scored_in_its_class_set_and_mapping(scene, tmp_path):
    """startDice hands `ctsynth evaluate` the synthetic CT's provenance beside it and the segments in its class set:
    a vertebra stays 'vertebrae', and the real `ctsynth evaluate` scores the files in the anatomy set and the full
    HU range. A CT without provenance is scored as before (paper set: the vertebra is body)."""
    true = shutil.which("true")
    if true is None:
        pytest.skip("needs a 'true' executable to stand in for PythonSlicer")
    synthetic, segmentation, _ = dice_case(scene, ("liver", "L3 vertebra"))
    real = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "real")
    real.Copy(synthetic)
    logic = SynthesisLogic(pythonExecutable=true, tempRoot=str(tmp_path), keepFiles=True)

    def dice_files(node) -> tuple[list[str], dict[str, str]]:
        task = logic.startDice(node, segmentation, real)
        task.wait(30)
        args = [str(a) for a in task.process.args]
        return args, json.loads(Path(args[args.index("--labels") + 1]).read_text())

    args, mapping = dice_files(synthetic)  # no provenance: a paper-set, paper-window CT as before
    assert sorted(mapping.values()) == ["body", "liver"]
    assert not (Path(args[args.index("--synthetic") + 1]).parent / "synthetic.json").exists()

    provenance = anatomy_provenance()
    synthetic.SetAttribute(ATTRIBUTE_PREFIX + "Synthetic", "true")
    synthetic.SetAttribute(ATTRIBUTE_PREFIX + "Provenance", json.dumps(provenance, sort_keys=True))
    args, mapping = dice_files(synthetic)
    assert sorted(mapping.values()) == ["liver", "vertebrae"]
    option = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert json.loads((Path(option("--synthetic")).parent / "synthetic.json").read_text()) == provenance
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "CTSemanticSynthLib.cli", "evaluate", "--synthetic",
                             option("--synthetic"), "--seg", option("--seg"), "--labels", option("--labels"),
                             "--real", option("--real"), "--json", str(report)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    scored = json.loads(report.read_text())
    assert scored["hu_real_range"] == [-1024, 2000]  # the full range, not the paper's -160..240 HU
    assert scored["voxels"]["vertebrae"] > 0 and scored["hu_real"]["vertebrae"]["mean"] == pytest.approx(1200)

    synthetic.SetAttribute(ATTRIBUTE_PREFIX + "Provenance", "{cut short")
    work = set(tmp_path.iterdir())
    with pytest.raises(ValueError, match="provenance stored on 'case synthetic CT' is not readable"):
        logic.startDice(synthetic, segmentation, real)
    assert set(tmp_path.iterdir()) == work  # nothing written, nothing started


def test_dice_inputs_are_written_uncompressed_for_the_background_process(scene, tmp_path):
    """Compressing a large CT takes seconds: what the GUI thread writes for `ctsynth evaluate` is raw NRRD."""
    true = shutil.which("true")
    if true is None:
        pytest.skip("needs a 'true' executable to stand in for PythonSlicer")
    synthetic, segmentation, _ = dice_case(scene)
    real = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "real")
    real.Copy(synthetic)
    logic = SynthesisLogic(pythonExecutable=true, tempRoot=str(tmp_path), keepFiles=True)
    task = logic.startDice(synthetic, segmentation, real)
    task.wait(30)
    args = [str(a) for a in task.process.args]
    written = [Path(args[args.index(option) + 1]) for option in ("--synthetic", "--real", "--seg")]
    assert [nrrd_encoding(p) for p in written] == ["raw"] * 3


@pytest.mark.skipif(importlib.util.find_spec("totalsegmentator") is None, reason="TotalSegmentator is not installed")
def test_dice_offline_missing_weights_then_tiny_random_weights(scene, tmp_path):
    """The Dice button's logic with the installed TotalSegmentator, offline: missing weights are their own error (the
    Widget offers TotalSegmentator's download only when online); with the tiny random-weight model (every voxel
    'liver') the table holds the Dice computed by hand."""
    from data_builders.tiny_totalseg import build_tiny_totalseg

    synthetic, segmentation, labels = dice_case(scene)
    env = {"OMP_NUM_THREADS": "1", "TOTALSEG_WEIGHTS_PATH": str(tmp_path / "no-weights")}
    offline = SynthesisLogic(environment=env, tempRoot=str(tmp_path))
    ids = node_ids(scene)
    task = offline.startDice(synthetic, segmentation, device="cpu")
    assert task.wait(300) is State.FAILED
    with pytest.raises(TotalSegmentatorWeightsMissing, match="no-weights"):
        offline.finishDice(task)
    assert node_ids(scene) == ids and not task.workDir.exists()
    command = offline.weightsDownloadCommand(fast=True)  # never run here: it would download
    assert command[1:4] == ["-m", "CTSemanticSynthSlicerLib.weights", "--"]
    assert command[5:] == ["-m", "totalsegmentator.bin.totalseg_download_weights", "-t", "total_fast"]
    assert importlib.util.find_spec(command[6]) is not None  # TotalSegmentator's own public command

    build_tiny_totalseg(tmp_path / "weights", constant_label=5)  # TotalSegmentator v2 id 5: liver
    logic = SynthesisLogic(environment={**env, "TOTALSEG_WEIGHTS_PATH": str(tmp_path / "weights")},
                           tempRoot=str(tmp_path))
    task = logic.startDice(synthetic, segmentation, device="cpu")
    assert task.wait(600) is State.SUCCEEDED, task.process.lines[-20:]
    table, predicted = logic.finishDice(task)
    rows = {table.GetCellText(r, 0): float(table.GetCellText(r, 1)) for r in range(table.GetNumberOfRows())}
    liver = np.count_nonzero(labels == 1)
    assert rows["Liver"] == pytest.approx(2 * liver / (liver + labels.size), abs=1e-6) and rows["Spleen"] == 0.0
    segments = predicted.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())] == ["Liver"]


FAKE_DOWNLOAD = """import pathlib, shutil, sys
source, target, cut = map(pathlib.Path, sys.argv[1:4])
for model in source.iterdir():
    if (target / model.name).exists():
        continue  # TotalSegmentator skips a model whose folder exists
    shutil.copytree(model, target / model.name)
    if not cut.exists():  # the first download is cut short
        cut.touch()
        checkpoint = next((target / model.name).rglob("checkpoint_final.pth"))
        checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
        sys.exit(1)
"""


@pytest.mark.parametrize("broken_before", [False, True], ids=["cut-during", "left-by-an-earlier-cut"])
def test_a_cut_short_weight_download_is_detected_and_redone(tmp_path, broken_before):
    """The background download (CTSemanticSynthSlicerLib.weights) around a stand-in for TotalSegmentator's command
    that, like it, skips a model folder that exists; its first download is cut short."""
    import socket as sockets

    from data_builders.tiny_totalseg import build_tiny_totalseg
    from CTSemanticSynthSlicerLib.weights import incomplete

    source, weights, cut = tmp_path / "release", tmp_path / "weights", tmp_path / "cut"
    build_tiny_totalseg(source)
    weights.mkdir()
    if broken_before:  # a folder an earlier, cancelled download left behind
        shutil.copytree(next(source.iterdir()), weights / next(source.iterdir()).name)
        checkpoint = next(weights.rglob("checkpoint_final.pth"))
        checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
        cut.touch()
        assert incomplete(weights) == [checkpoint.parents[2]]
    logic = SynthesisLogic(environment={"TOTALSEG_WEIGHTS_PATH": str(weights)})
    with sockets.socket() as server:  # stands in for the download server: the connection check passes
        server.bind(("127.0.0.1", 0))
        server.listen()
        command = logic.weightsDownloadCommand()[:3] + ["--host", "127.0.0.1", "--port", str(server.getsockname()[1]),
                                                        "--", sys.executable, "-c", FAKE_DOWNLOAD, str(source),
                                                        str(weights), str(cut)]
        done = subprocess.run(command, env=logic.childEnvironment(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removing the incomplete download" in done.stdout and incomplete(weights) == []
    assert next(weights.rglob("checkpoint_final.pth")).read_bytes() == next(source.rglob("checkpoint_final.pth")).read_bytes()


def test_weight_download_offline_is_one_line(tmp_path):
    logic = SynthesisLogic(environment={"TOTALSEG_WEIGHTS_PATH": str(tmp_path)})
    command = logic.weightsDownloadCommand()[:3] + ["--host", "127.0.0.1", "--port", "9", "--", "false"]
    done = subprocess.run(command, env=logic.childEnvironment(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == ""
    assert done.stdout.startswith("error: no connection to 127.0.0.1") and done.stdout.count("\n") == 1


def test_samples_give_several_volumes_and_a_variance_overlay(scene, logic, tiny_model, tmp_path):
    from CTSemanticSynthSlicerLib.synthesis import VARIANCE_THRESHOLD_HU

    segmentation = load_segmentation(scene, names="totalseg")
    task = logic.startSynthesis(segmentation, model=str(tiny_model), seed=5, samples=3, **FAST)
    task.wait(240)
    first = logic.finishSynthesis(task)
    samples, variance = task.nodes["samples"], task.nodes["variance"]
    assert samples[0] is first and [n.GetName() for n in samples] == [
        "case01 organs synthetic CT", "case01 organs synthetic CT sample 2", "case01 organs synthetic CT sample 3"]
    assert [n.GetAttribute(ATTRIBUTE_PREFIX + "Seed") for n in samples] == ["5", "6", "7"]
    arrays = np.stack([slicer.util.arrayFromVolume(n).astype(np.float32) for n in samples])
    std = slicer.util.arrayFromVolume(variance)
    np.testing.assert_allclose(std, arrays.std(axis=0), atol=1e-3)
    assert std.max() > 0 and np.array_equal(matrix(variance), matrix(first))
    assert variance.GetAttribute(ATTRIBUTE_PREFIX + "VarianceOf") == first.GetID()
    display = variance.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == VARIANCE_THRESHOLD_HU  # transparent below
    assert display.GetLevel() - display.GetWindow() / 2 == VARIANCE_THRESHOLD_HU  # the colours start there
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeRainbow"  # no black end darkening the CT
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(variance)
    assert legend is not None and legend.GetTitleText() == "std (HU)" and legend.GetVisibility()  # shown
    assert list(tmp_path.iterdir()) == []  # the temporary folder was removed


def test_regenerate_edited_region_keeps_the_rest_and_can_be_undone(scene, logic, tiny_model):
    from CTSemanticSynthLib.regenerate import grow
    from CTSemanticSynthSlicerLib.regeneration import STATE_ROLE, UNDO_ROLE

    segmentation = load_segmentation(scene, names="totalseg")
    options = {"model": str(tiny_model), "seed": 5, **FAST}
    output = logic.synthesize(segmentation, timeout=240, **options)
    first_state = output.GetNodeReference(STATE_ROLE)
    assert first_state.GetHideFromEditors() and "gallbladder" in first_state.GetAttribute(ATTRIBUTE_PREFIX + "LabelMapping")
    assert first_state.GetImageData().GetDimensions() == output.GetImageData().GetDimensions()
    before = slicer.util.arrayFromVolume(output).copy()

    ids = node_ids(scene)
    with pytest.raises(SynthesisError, match="nothing to regenerate"):  # no edit yet
        logic.synthesize(segmentation, timeout=240, outputVolumeNode=output, regionMarginMm=6.0, **options)
    assert node_ids(scene) == ids and np.array_equal(slicer.util.arrayFromVolume(output), before)

    gallbladder = next(s for s in logic.segments(segmentation) if s.labelValue == 4)
    voxels = slicer.util.arrayFromVolume(first_state)
    mapping = json.loads(first_state.GetAttribute(ATTRIBUTE_PREFIX + "LabelMapping"))
    removed = voxels == int(next(v for v, name in mapping.items() if name == "gallbladder"))
    segmentation.GetSegmentation().RemoveSegment(gallbladder.segmentId)  # the user's edit
    assert logic.synthesize(segmentation, timeout=240, outputVolumeNode=output, regionMarginMm=6.0, **options) is output

    after = slicer.util.arrayFromVolume(output)
    region = grow(removed.transpose(2, 1, 0), (3.0, 3.0, 3.0), 6.0).transpose(2, 1, 0)  # K, J, I -> I, J, K and back
    assert np.array_equal(after[~region], before[~region]) and (after[region] != before[region]).mean() > 0.5
    assert "region" in json.loads(output.GetAttribute(ATTRIBUTE_PREFIX + "Provenance"))
    undo, state = output.GetNodeReference(UNDO_ROLE), output.GetNodeReference(STATE_ROLE)
    assert undo.GetHideFromEditors() and np.array_equal(slicer.util.arrayFromVolume(undo), before)
    assert undo.GetNodeReference(STATE_ROLE) is first_state and state is not first_state
    assert not (slicer.util.arrayFromVolume(state)[removed]).any()  # the state follows the edit

    logic.undoRegeneration(output)
    assert np.array_equal(slicer.util.arrayFromVolume(output), before)
    assert output.GetNodeReference(STATE_ROLE) is first_state and output.GetNodeReference(UNDO_ROLE) is None
    assert scene.GetNodeByID(undo.GetID()) is None and scene.GetNodeByID(state.GetID()) is None
    assert "region" not in json.loads(output.GetAttribute(ATTRIBUTE_PREFIX + "Provenance"))


def test_regenerate_needs_a_synthetic_ct_made_here(scene, logic):
    segmentation = load_segmentation(scene, names="totalseg")
    other = load_volume(scene, SAMPLE_CT, "case01 CT")
    ids = node_ids(scene)
    with pytest.raises(ValueError, match="'case01 CT' has no stored segmentation"):
        logic.startSynthesis(segmentation, outputVolumeNode=other, regionMarginMm=10.0)
    with pytest.raises(ValueError, match="one sample"):
        logic.startSynthesis(segmentation, outputVolumeNode=other, regionMarginMm=10.0, samples=2)
    assert node_ids(scene) == ids


# --- the model's class set, the reference CT's body outline, one window for both review sides ----------------------
@pytest.fixture(scope="module")
def tiny_anatomy_model(tmp_path_factory) -> Path:
    """A tiny random model on the 36-class anatomy set with full-range HU."""
    import torch

    from conftest import randomise_zero_layers, tiny_model_config
    from CTSemanticSynthLib.checkpoint import save_model
    from CTSemanticSynthLib.diffusion import GaussianDiffusion, diffusion_defaults
    from CTSemanticSynthLib.intensity import FULL_RANGE
    from CTSemanticSynthLib.labels import class_set
    from CTSemanticSynthLib.models import UNetModel

    anatomy = class_set("anatomy")
    torch.manual_seed(0)
    model = randomise_zero_layers(UNetModel(**tiny_model_config(), num_classes=len(anatomy.classes)))
    folder = tmp_path_factory.mktemp("models") / "tiny-anatomy"
    save_model(folder, model, GaussianDiffusion(**diffusion_defaults()), name="tiny-anatomy", classes=anatomy,
               intensity=FULL_RANGE, extra={"class_means": [0.0] + [0.5] * (len(anatomy.classes) - 1)})
    return folder


def exported_classes(args: list[str], scene) -> np.ndarray:
    """Class names per voxel of the label map and mapping a (stand-in) ``ctsynth synth`` was given."""
    option = lambda name: args[args.index(name) + 1]  # noqa: E731
    mapping = json.loads(Path(option("--labels")).read_text())
    names = np.array(["background"] + [mapping[str(v)] for v in range(1, len(mapping) + 1)])
    return names[slicer.util.arrayFromVolume(load_volume(scene, Path(option("--seg")), "exported"))]


def test_segments_reach_the_command_in_the_models_class_set_with_the_reference_ct(scene, tmp_path):
    """A TotalSegmentator-extension segmentation ('superior lobe of left lung', 'L3 vertebra', 'left rib 7', ...):
    every structure of the anatomy set keeps its class, and the paper set gets exactly what it got before; the
    reference CT goes along as --reference-ct, voxel for voxel."""
    from CTSemanticSynthLib.labels import class_from_name, class_set

    true = shutil.which("true")
    if true is None:
        pytest.skip("needs a 'true' executable to stand in for PythonSlicer")
    logic = SynthesisLogic(pythonExecutable=true, tempRoot=str(tmp_path), keepFiles=True)
    segmentation = load_segmentation(scene, names="extension")
    names = {segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())}
    assert {"superior lobe of left lung", "L3 vertebra", "left rib 7", "left deep back muscle"} <= names
    ct = load_volume(scene, SAMPLE_CT, "case01 CT")
    source = slicer.util.arrayFromVolume(load_volume(scene, SAMPLE_SEG, "TotalSegmentator ids"))
    table = totalsegmentator_names(2)
    for name in ("anatomy", "paper"):
        classes = class_set(name)
        task = logic.startSynthesis(segmentation, referenceVolumeNode=ct, classSet=name, steps=2)
        task.wait(30)
        assert not task.warnings  # every segment name is known anatomy: nothing 'unrecognised'
        got = exported_classes(task.process.args, scene)
        expected = {v: classes.classes[class_from_name(n, classes) or classes.body] for v, n in table.items()}
        labelled = source != 0
        assert (got[labelled] == np.vectorize(expected.get)(source[labelled])).all()
        assert set(got[labelled].tolist()) >= ({"vertebrae", "ribs", "lung", "autochthon", "pelvis", "liver"}
                                               if name == "anatomy" else {"body", "liver"})
        reference = Path(task.process.args[task.process.args.index("--reference-ct") + 1])
        assert np.array_equal(slicer.util.arrayFromVolume(load_volume(scene, reference, "sent")),
                              slicer.util.arrayFromVolume(ct))
        task.cleanup()


def test_anatomy_model_run_takes_the_body_from_the_reference_and_lists_unknown_segments(scene, tmp_path,
                                                                                          tiny_anatomy_model):
    """Apply with a full-range anatomy model: the class set comes from the model's card, the body outline from the
    reference CT; the panel's summary names both, the intensity mapping and the segments the model does not know."""
    logic = SynthesisLogic(environment={"OMP_NUM_THREADS": "1"}, tempRoot=str(tmp_path))
    segmentation = load_segmentation(scene, names="extension")
    segments = segmentation.GetSegmentation()
    segments.GetSegment(segments.GetSegmentIdBySegmentName("prostate")).SetName("Tumor")
    ct = load_volume(scene, SAMPLE_CT, "case01 CT")
    output = logic.synthesize(segmentation, timeout=300, model=str(tiny_anatomy_model), referenceVolumeNode=ct,
                              seed=2, **FAST)
    provenance = json.loads(output.GetAttribute(ATTRIBUTE_PREFIX + "Provenance"))
    assert provenance["class_set"] == "anatomy" and provenance["inputs"]["body_outline"].startswith("reference CT")
    summary = logic.synthesisSummary(output).splitlines()
    assert summary == [
        "Class set: anatomy (36 classes); intensity: full_range (-1024 HU -> 0, -160 HU -> 0.2, 240 HU -> 0.8, "
        "2000 HU -> 1; clipped outside -1024..2000 HU)",
        f"Body outline: {provenance['inputs']['body_outline']}",
        "Segments the model does not know (1, synthesized as body tissue): 'Tumor'"]
    state = output.GetNodeReference("CTSemanticSynthSegmentationState")
    assert {"vertebrae", "ribs", "lung"} <= set(json.loads(state.GetAttribute(ATTRIBUTE_PREFIX + "LabelMapping")).values())
    assert logic.reviewWindows(output) == ("Abdomen", "Bone", "Lung")
    assert logic.synthesisSummary(ct) == ""  # not a synthetic CT


def test_a_paper_model_run_lists_the_structures_it_has_no_class_for(scene, logic, tiny_model):
    from CTSemanticSynthLib.labels import class_from_name

    segmentation = load_segmentation(scene, names="extension")
    output = logic.synthesize(segmentation, timeout=240, model=str(tiny_model), seed=1, **FAST)
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    without = [n for n in names if class_from_name(n) is None]  # bones, lungs, muscles, bowel, vessels
    summary = logic.synthesisSummary(output).splitlines()
    assert summary[0].startswith("Class set: paper (17 classes); intensity: paper_window (")
    assert summary[1].startswith("Body outline: labelled structures")
    assert summary[2].startswith(f"Segments the model does not know ({len(without)}, synthesized as body tissue): "
                                 f"'{without[0]}'") and summary[2].endswith(f"and {len(without) - 12} more")
    assert logic.reviewWindows(output) == ("Abdomen",)


def _synthetic_stand_in(scene, name: str, intensity: dict | None):
    node = load_volume(scene, SAMPLE_CT, name)
    node.SetAttribute(ATTRIBUTE_PREFIX + "Synthetic", "true")
    if intensity is not None:
        node.SetAttribute(ATTRIBUTE_PREFIX + "Provenance", json.dumps({"intensity": intensity}))
    return node


def test_review_shows_both_sides_in_one_window_blinded_or_not(scene, logic):
    """A full-range model's CT and the real CT share the Abdomen, Bone or Lung window, also while blinded (a drag
    is put back to the shared window); a paper-window model's CT is clipped outside the abdomen window, so other
    windows are refused and nothing changes."""
    from CTSemanticSynthLib.intensity import FULL_RANGE, PAPER_WINDOW

    segmentation = load_segmentation(scene)
    real = load_volume(scene, SAMPLE_CT, "case01 CT")
    full = _synthetic_stand_in(scene, "full-range synthetic", FULL_RANGE.config())
    paper = _synthetic_stand_in(scene, "paper synthetic", PAPER_WINDOW.config())
    old = _synthetic_stand_in(scene, "synthetic without a recorded mapping", None)
    slice_views(scene)
    assert [logic.reviewWindows(n) for n in (full, paper, old)] == [("Abdomen", "Bone", "Lung"), ("Abdomen",),
                                                                   ("Abdomen",)]
    windows = lambda: [(n.GetDisplayNode().GetWindow(), n.GetDisplayNode().GetLevel()) for n in (real, full)]  # noqa: E731

    logic.showReview(full, segmentation, real, window="Bone")
    assert windows() == [(1800, 400)] * 2
    logic.setReviewWindow("Lung")
    assert windows() == [(1000, -500)] * 2
    logic.showReview(full, segmentation, real, swap=True, blind=True, window="Abdomen")
    assert windows() == [(400, 40)] * 2
    logic.setReviewWindow("Bone")  # blinded: both sides change together ...
    assert windows() == [(1800, 400)] * 2
    full.GetDisplayNode().SetWindowLevel(400, 40)  # ... and a drag on one side is put back
    assert windows() == [(1800, 400)] * 2
    logic.reveal()
    assert windows() == [(1000, -500)] * 2  # the display from before the blinded review, as for every property

    logic.showReview(paper, segmentation, real, blind=True)
    shown = [(n.GetDisplayNode().GetWindow(), n.GetDisplayNode().GetLevel()) for n in (real, paper)]
    assert shown == [(400, 40)] * 2
    with pytest.raises(ValueError, match="Bone window shows HU outside .* use Abdomen"):
        logic.setReviewWindow("Bone")
    assert [(n.GetDisplayNode().GetWindow(), n.GetDisplayNode().GetLevel()) for n in (real, paper)] == shown
    logic.reveal()
    with pytest.raises(ValueError, match="Lung window"):
        logic.showReview(old, segmentation, real, window="Lung")
    assert not logic.blinding.active


def test_a_model_whose_class_set_changed_since_its_card_was_read_loads_nothing(scene, logic, tiny_model):
    """The segments were mapped onto the class set of the card read earlier; a model folder replaced since then
    (here: the card said anatomy, the model is a paper-set one) would give silently wrong classes: refused."""
    segmentation = segmentationFromArray(np.pad(np.ones((4, 8, 8), np.int16), 2), np.diag([2.0, 2.0, 3.0, 1.0]),
                                         "organs", ("liver",))
    logic.modelConfigs[str(tiny_model)] = {"class_set": "anatomy"}
    ids = node_ids(scene)
    with pytest.raises(SynthesisError, match="class set is 'paper', but the segments were mapped onto 'anatomy'"):
        logic.synthesize(segmentation, timeout=240, model=str(tiny_model), **FAST)
    assert node_ids(scene) == ids and logic.modelConfigs == {}  # the card is read again on the next Apply


def test_regenerating_a_bone_with_an_anatomy_model(scene, tmp_path, tiny_anatomy_model):
    """What changed is judged in the model's class set: a removed vertebra is a change for the anatomy model (for the
    paper set it was body before and after), and the stored mapping's anatomy class names are read in that set."""
    from CTSemanticSynthLib.regenerate import grow

    logic = SynthesisLogic(environment={"OMP_NUM_THREADS": "1"}, tempRoot=str(tmp_path))
    segmentation = load_segmentation(scene, names="extension")
    ct = load_volume(scene, SAMPLE_CT, "case01 CT")
    options = {"model": str(tiny_anatomy_model), "seed": 4, "referenceVolumeNode": ct, **FAST}
    output = logic.synthesize(segmentation, timeout=300, **options)
    before = slicer.util.arrayFromVolume(output).copy()
    l3 = next(s for s in logic.segments(segmentation) if s.name == "L3 vertebra")
    removed = slicer.util.arrayFromVolume(load_volume(scene, SAMPLE_SEG, "ids")) == l3.labelValue
    segmentation.GetSegmentation().RemoveSegment(l3.segmentId)
    assert logic.synthesize(segmentation, timeout=300, outputVolumeNode=output, regionMarginMm=3.0, **options) is output
    after = slicer.util.arrayFromVolume(output)
    region = grow(removed.transpose(2, 1, 0), (3.0, 3.0, 3.0), 3.0).transpose(2, 1, 0)
    assert np.array_equal(after[~region], before[~region]) and (after[region] != before[region]).mean() > 0.5
