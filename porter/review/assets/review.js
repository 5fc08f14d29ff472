// porter review: margin-note layout, filters, grouping tabs, n/p navigation, links to both sides.
"use strict";
(function () {
  const scroller = document.getElementById("scroller");
  const grid = document.getElementById("grid");
  const notesPane = document.getElementById("notes");
  const slots = Array.from(notesPane.querySelectorAll(".note-slot"));
  const ruleFilter = document.getElementById("rule-filter");
  const classFilter = document.getElementById("class-filter");
  const entries = Array.from(document.querySelectorAll("#sidebar a.entry"));
  const firstCellOfRow = new Map();
  for (const cell of grid.children) {
    const row = Number(cell.dataset.row);
    if (!firstCellOfRow.has(row)) firstCellOfRow.set(row, cell);
  }
  let current = null; // the note (section) shown as current

  function visible(note) {
    return !note.parentElement.classList.contains("filtered");
  }

  // Notes sit beside their rows, pushed down where an earlier one is still in the way.
  function layout() {
    let bottom = 0;
    for (const slot of slots) {
      if (slot.classList.contains("filtered")) continue;
      const cell = firstCellOfRow.get(Number(slot.dataset.row));
      // Rows are measured from the scroller, notes from their own column, which starts where the grid does.
      const top = Math.max(cell ? cell.offsetTop - grid.offsetTop : 0, bottom + 4);
      slot.style.top = top + "px";
      bottom = top + slot.offsetHeight;
    }
    notesPane.style.height = Math.max(bottom + 8, grid.offsetHeight) + "px";
  }

  function matches(element) {
    const rule = ruleFilter.value;
    const klass = classFilter.value;
    return (!rule || element.dataset.rule === rule) && (!klass || element.dataset.class === klass);
  }

  function applyFilters() {
    let shown = 0;
    for (const slot of slots) {
      const note = slot.firstElementChild;
      const keep = matches(note);
      slot.classList.toggle("filtered", !keep);
      if (keep && note.classList.contains("hunk")) shown += 1;
      if (note.classList.contains("hunk")) {
        for (const line of grid.querySelectorAll("." + note.id)) line.classList.toggle("hidden-" + note.id, !keep);
      }
    }
    for (const entry of entries) entry.parentElement.classList.toggle("filtered", !matches(entry));
    for (const group of document.querySelectorAll("#sidebar details.group[data-group]")) {
      const any = group.querySelector("li:not(.filtered)");
      group.classList.toggle("filtered", !any);
      if (ruleFilter.value || classFilter.value) group.open = Boolean(any);
    }
    // A changed line stays marked while any change of it is shown.
    for (const line of grid.querySelectorAll(".ln.chg, .ln.cut")) {
      const ids = Array.from(line.classList).filter((name) => /^c\d+$/.test(name));
      line.classList.toggle("muted", ids.every((id) => line.classList.contains("hidden-" + id)));
    }
    document.getElementById("shown-count").textContent = String(shown);
    if (current && !visible(current)) select(null, false);
    layout();
  }

  function linesOf(note) {
    return note ? Array.from(grid.querySelectorAll("." + note.id)) : [];
  }

  function select(note, scroll) {
    for (const line of linesOf(current)) line.classList.remove("cur");
    if (current) current.classList.remove("current");
    for (const entry of document.querySelectorAll("#sidebar a.current")) entry.classList.remove("current");
    current = note;
    document.body.dataset.current = note ? note.id : "";
    if (!note) return;
    note.classList.add("current");
    for (const line of linesOf(note)) line.classList.add("cur");
    for (const entry of document.querySelectorAll('#sidebar a[data-note="' + note.id + '"]')) {
      entry.classList.add("current");
      entry.closest("details").open = true;
      entry.scrollIntoView({ block: "nearest" });
    }
    layout();
    if (scroll) {
      const cell = firstCellOfRow.get(Number(note.parentElement.dataset.row));
      const heads = document.getElementById("heads").offsetHeight;
      scroller.scrollTop = Math.max((cell ? cell.offsetTop : 0) - heads - scroller.clientHeight / 4, 0);
    }
  }

  // n / p walk the shown notes in the order of the rows they belong to.
  function step(direction) {
    const shown = slots.map((slot) => slot.firstElementChild).filter((note) => visible(note));
    if (!shown.length) return;
    const at = shown.indexOf(current);
    const next = at < 0 ? (direction > 0 ? 0 : shown.length - 1) : (at + direction + shown.length) % shown.length;
    select(shown[next], true);
  }

  function flash(id) {
    const line = document.getElementById(id);
    if (!line) return;
    const heads = document.getElementById("heads").offsetHeight;
    scroller.scrollTop = Math.max(line.offsetTop - heads - scroller.clientHeight / 4, 0);
    line.classList.remove("flash");
    void line.offsetWidth; // restart the animation
    line.classList.add("flash");
  }

  document.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLSelectElement || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "n" || event.key === "j") step(1);
    else if (event.key === "p" || event.key === "k") step(-1);
    else return;
    event.preventDefault();
  });
  notesPane.addEventListener("click", (event) => {
    const link = event.target.closest("a[data-line]");
    const note = event.target.closest(".note");
    if (link) {
      event.preventDefault();
      flash(link.dataset.line);
    }
    if (note && note !== current) select(note, !link);
  });
  document.getElementById("sidebar").addEventListener("click", (event) => {
    const link = event.target.closest("a[data-note]");
    if (link) {
      event.preventDefault();
      select(document.getElementById(link.dataset.note), true);
      return;
    }
    const tab = event.target.closest(".tabs button");
    if (!tab) return;
    for (const button of document.querySelectorAll(".tabs button")) button.classList.toggle("active", button === tab);
    for (const grouping of document.querySelectorAll(".grouping")) grouping.hidden = grouping.id !== tab.dataset.group;
  });
  ruleFilter.addEventListener("change", applyFilters);
  classFilter.addEventListener("change", applyFilters);
  // Rows change height when lines wrap differently (a window resized, a scroll bar appearing,
  // fonts settling): the notes follow.
  new ResizeObserver(() => layout()).observe(grid);
  window.addEventListener("load", layout);
  applyFilters();
  document.body.dataset.ready = "1"; // for tools driving the page: the notes are placed
  if (location.hash && document.getElementById(location.hash.slice(1))) flash(location.hash.slice(1));
})();
